// A count with its noun, the same on every page: "1 desktop", "2 desktops" (gateway/web/context.py
// does the same for the templates). `plural` for the nouns that don't just add an "s".
export function noun(n, singular, plural = `${singular}s`) {
  return n === 1 ? singular : plural;
}

export function counted(n, singular, plural = `${singular}s`) {
  return `${n} ${noun(n, singular, plural)}`;
}
