// QEMU's migration stream constants (docs/QEMU-SNAPSHOT.md): the TypeScript
// home of every one we read or write (server/qemu-snapshot.ts reads a stream,
// server/qemu-source.ts writes a preamble). addon/qemu_stream.h is the native
// home (addon/qemu_source.cc writes the RAM and reads the return path);
// test/constants.test.ts compares the two constant by constant. All fields on
// the stream are big-endian.

/** The file header: magic "QEVM", the stream version we speak, and the most one command package may hold. */
export const Stream = { magic: 0x5145564d, version: 3, maxPackaged: 1 << 24 } as const;

/** Section (record) types (QEMU_VM_*). */
export const Section = {
  eof: 0x00,
  start: 0x01,
  part: 0x02,
  end: 0x03,
  full: 0x04,
  vmDescription: 0x06,
  configuration: 0x07,
  command: 0x08,
  footer: 0x7e,
} as const;

/** RAM record flags (RAM_SAVE_FLAG_*), in the low bits of each record's address. */
export const RamFlag = {
  full: 0x01,
  zero: 0x02,
  memSize: 0x04,
  page: 0x08,
  eos: 0x10,
  continue: 0x20,
  xbzrle: 0x40,
  hook: 0x80,
  compressPage: 0x100,
  multifdFlush: 0x200,
} as const;

/** Commands inside a command section (MIG_CMD_*). */
export const Command = {
  openReturnPath: 1,
  ping: 2,
  postcopyAdvise: 3,
  postcopyListen: 4,
  postcopyRun: 5,
  postcopyRamDiscard: 6,
  packaged: 7,
} as const;

/** Return-path messages, destination to source (MIG_RP_MSG_*). */
export const ReturnPath = { shut: 1, pong: 2, reqPagesId: 3, reqPages: 4 } as const;
