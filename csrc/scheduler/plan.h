// Which block trains on which batch at which tick: pure C++, no torch, tested for exact
// equality. Block i needs only block i-1's outputs for the same batch, so in a pipeline
// block i trains on batch k - i at tick k, and a pass over n batches with L blocks takes
// n + L - 1 ticks instead of the n * L of the sequential loop.
#pragma once

#include <vector>

namespace al_ext::scheduler {

struct Task {
  int block = 0;
  int batch = 0;
  bool operator==(const Task& other) const { return block == other.block && batch == other.batch; }
};

// One entry per tick: the tasks that run in it, in block order.
using Plan = std::vector<std::vector<Task>>;

// Every block works at once on consecutive batches: tick k runs (i, k - i) for each valid i.
Plan pipeline_plan(int num_blocks, int num_batches);

// The loop every published AL code runs: batch by batch, block by block, one task a tick.
Plan sequential_plan(int num_blocks, int num_batches);

// The order in which one block sees the batches in a plan (what exactness rests on).
std::vector<int> batches_of_block(const Plan& plan, int block);

// Splits blocks 0..n-1, with the given costs, into at most `workers` groups of consecutive
// blocks so that the costliest group is as cheap as possible (a pipeline runs at the pace
// of its slowest stage). Returns each group's first block; ties go to the earliest split.
std::vector<int> balanced_groups(const std::vector<double>& costs, int workers);

}  // namespace al_ext::scheduler
