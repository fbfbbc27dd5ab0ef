// Limits shared by both ends; the native twins live in addon/wire.h.

/** The largest page run on a data channel, in bytes (wire::kMaxRunBytes). */
export const MAX_RUN_BYTES = 2 << 20;
