// Which blocks form each pipeline stage: pure C++, no torch, tested for exact equality.
// (Which block trains on which batch needs no plan: each stage runs its blocks on the
// batches in stream order, so every block sees them in the order of the sequential loop.)
#pragma once

#include <vector>

namespace al_ext::scheduler {

// Splits blocks 0..n-1, with the given costs, into at most `workers` groups of consecutive
// blocks so that the costliest group is as cheap as possible (a pipeline runs at the pace
// of its slowest stage). Returns each group's first block; ties go to the earliest split.
std::vector<int> balanced_groups(const std::vector<double>& costs, int workers);

}  // namespace al_ext::scheduler
