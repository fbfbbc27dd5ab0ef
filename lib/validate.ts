// Argument checks run before anything crosses into C++: the addon trusts what
// it is given, so every type, range and alignment is settled here.
import { invalidArgType, invalidArgValue, outOfRange } from './errors.js';

export function validateInteger(value: unknown, name: string, min = 0, max = Number.MAX_SAFE_INTEGER): number {
  if (typeof value !== 'number') throw invalidArgType(name, 'of type number', value);
  if (!Number.isSafeInteger(value) || value < min || value > max) throw outOfRange(name, `an integer >= ${min} and <= ${max}`, value);
  return value;
}

export function validateFd(value: unknown, name = 'fd'): number {
  return validateInteger(value, name, 0, 0x7fffffff);
}

export function validateAligned(value: unknown, name: string, alignment: number, min = 0): number {
  const n = validateInteger(value, name, min);
  if (n % alignment !== 0) throw outOfRange(name, `a multiple of ${alignment}`, n);
  return n;
}

export function validateBoolean(value: unknown, name: string): boolean {
  if (typeof value !== 'boolean') throw invalidArgType(name, 'of type boolean', value);
  return value;
}

export function validateString(value: unknown, name: string): string {
  if (typeof value !== 'string') throw invalidArgType(name, 'of type string', value);
  return value;
}

export function validateBytes(value: unknown, name: string): Uint8Array {
  if (!(value instanceof Uint8Array)) throw invalidArgType(name, 'an instance of Buffer or Uint8Array', value);
  return value;
}

export function validateOneOf<T extends string>(value: unknown, name: string, allowed: readonly T[]): T {
  if (typeof value !== 'string' || !(allowed as readonly string[]).includes(value)) throw invalidArgValue(name, allowed, value);
  return value as T;
}

export function validateObject(value: unknown, name: string): Record<string, unknown> {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) throw invalidArgType(name, 'of type object', value);
  return value as Record<string, unknown>;
}

/** Checks that [offset, offset+length) lies inside a buffer or region of `size` bytes. */
export function validateRange(offset: number, length: number, size: number, what: string): void {
  if (offset + length > size) throw outOfRange(`${what} range`, `inside ${size} bytes`, `${offset}+${length}`);
}

/** True when any two [start, end) ranges overlap. */
export function hasOverlap(ranges: readonly (readonly [number, number])[]): boolean {
  const sorted = [...ranges].sort((a, b) => a[0] - b[0]);
  return sorted.some((r, i) => i > 0 && r[0] < sorted[i - 1][1]);
}
