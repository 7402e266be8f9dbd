#pragma once
// Waste accounting: device memory-time (byte-seconds) per category, added every step, so the
// engine can say how much of its memory went to paused contexts, recomputation and
// swap stalls, against the total capacity over the same time.

namespace infercept {

/// Byte-seconds of device memory wasted, by cause.
struct WasteCounters {
  double preserved_idle_byte_s = 0;  // KV of paused requests held on the device (or copying out)
  double recompute_byte_s = 0;       // rebuilding discarded KV: its memory and the batch it delays
  double swap_stall_byte_s = 0;      // the batch's memory while the forward waits on a copy

  double total_byte_s() const { return preserved_idle_byte_s + recompute_byte_s + swap_stall_byte_s; }
  WasteCounters& operator+=(const WasteCounters& other) {
    preserved_idle_byte_s += other.preserved_idle_byte_s;
    recompute_byte_s += other.recompute_byte_s;
    swap_stall_byte_s += other.swap_stall_byte_s;
    return *this;
  }
};

/// Engine-wide totals: the waste and the capacity it is a fraction of.
struct WasteLedger {
  WasteCounters waste;
  double capacity_byte_s = 0;  // the whole device KV pool, over the accounted time
  double accounted_until_s = 0;
  bool started = false;

  double waste_fraction() const { return capacity_byte_s > 0 ? waste.total_byte_s() / capacity_byte_s : 0; }
};

}  // namespace infercept
