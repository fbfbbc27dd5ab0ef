// Words for people: how many of a thing, in English ("1 round", "3 rounds").

/** `n` and the noun, plural unless one: counted(1, 'round') is "1 round", counted(3, 'thread') is "3 threads". */
export function counted(n: number, noun: string, plural = `${noun}s`): string {
  return `${n.toLocaleString('en-US')} ${n === 1 ? noun : plural}`;
}
