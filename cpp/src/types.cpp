#include "infercept/types.h"

#include "infercept/errors.h"

namespace infercept {

const char* to_string(Tier tier) { return tier == Tier::kDevice ? "device" : "host"; }

}  // namespace infercept
