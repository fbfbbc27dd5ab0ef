// The transfer's own vocabulary, shared by source and destination: what a
// destination asks for (prefault window, background stream), its limits and
// defaults.

export interface TransferOptions {
  /** Pages sent after each requested page, and before it. */
  window: { forward: number; backward: number };
  /** Stream every page not yet sent; 0 bytes/s means unlimited. */
  background: { enabled: boolean; rateBytesPerSecond: number };
}

/** The widest prefault window either way, in pages. */
export const MAX_WINDOW = 1024;

/** Defaults chosen for a random-access workload on a fast local link (see bench/README.md). */
export const DEFAULT_TRANSFER: TransferOptions = {
  window: { forward: 8, backward: 2 },
  background: { enabled: true, rateBytesPerSecond: 0 },
};

/** The transfer options asked for, completed with the defaults. */
export function transferOptions(options: {
  window?: Partial<TransferOptions['window']>;
  background?: Partial<TransferOptions['background']>;
}): TransferOptions {
  return {
    window: { ...DEFAULT_TRANSFER.window, ...options.window },
    background: { ...DEFAULT_TRANSFER.background, ...options.background },
  };
}
