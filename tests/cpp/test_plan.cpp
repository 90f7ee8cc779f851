// Exact-equality tests of the pure planning code (csrc/scheduler/plan.cpp). Built and run
// by tests/test_scheduler.py, and by CMake as a ctest.
#include <cstdio>
#include <stdexcept>
#include <vector>

#include "../../csrc/scheduler/plan.h"

using al_ext::scheduler::Plan;
using al_ext::scheduler::Task;

static int failures = 0;
#define EXPECT(cond)                                                  \
  do {                                                                \
    if (!(cond)) {                                                    \
      std::printf("FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                     \
    }                                                                 \
  } while (0)

int main() {
  // 3 blocks, 4 batches: the fill, the steady state and the drain, written out in full.
  const Plan expected = {
      {{0, 0}},
      {{0, 1}, {1, 0}},
      {{0, 2}, {1, 1}, {2, 0}},
      {{0, 3}, {1, 2}, {2, 1}},
      {{1, 3}, {2, 2}},
      {{2, 3}},
  };
  EXPECT(al_ext::scheduler::pipeline_plan(3, 4) == expected);

  for (int blocks = 1; blocks <= 8; ++blocks) {
    for (int batches = 0; batches <= 20; ++batches) {
      const Plan pipe = al_ext::scheduler::pipeline_plan(blocks, batches);
      const Plan seq = al_ext::scheduler::sequential_plan(blocks, batches);
      EXPECT(pipe.size() == static_cast<size_t>(batches == 0 ? 0 : batches + blocks - 1));
      EXPECT(seq.size() == static_cast<size_t>(batches * blocks));
      std::vector<int> in_order(batches);
      for (int j = 0; j < batches; ++j) in_order[j] = j;
      for (int b = 0; b < blocks; ++b) {
        // Every block sees every batch once, in order, in both plans: the exactness property.
        EXPECT(al_ext::scheduler::batches_of_block(pipe, b) == in_order);
        EXPECT(al_ext::scheduler::batches_of_block(seq, b) == in_order);
      }
      // A block's input for batch j (block b-1, batch j) is produced in an earlier tick.
      for (size_t tick = 0; tick < pipe.size(); ++tick) {
        for (const Task& t : pipe[tick]) EXPECT(static_cast<int>(tick) == t.block + t.batch);
      }
    }
  }
  using al_ext::scheduler::balanced_groups;
  EXPECT((balanced_groups({1, 1, 1, 1}, 2) == std::vector<int>{0, 2}));
  EXPECT((balanced_groups({1, 1, 1, 1}, 4) == std::vector<int>{0, 1, 2, 3}));
  EXPECT((balanced_groups({1, 1, 1, 1}, 8) == std::vector<int>{0, 1, 2, 3}));  // no empty group
  EXPECT((balanced_groups({5, 1, 1, 1, 1, 1}, 2) == std::vector<int>{0, 1}));   // a costly first bridge
  EXPECT((balanced_groups({1, 2, 3, 4, 5, 6, 7, 8, 9}, 3) == std::vector<int>{0, 5, 7}));  // 15 | 13 | 17
  EXPECT((balanced_groups({3, 1, 1, 1}, 1) == std::vector<int>{0}));
  bool threw = false;
  try {
    al_ext::scheduler::pipeline_plan(0, 3);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  EXPECT(threw);
  std::printf("%s\n", failures ? "plan tests FAILED" : "plan tests passed");
  return failures ? 1 : 0;
}
