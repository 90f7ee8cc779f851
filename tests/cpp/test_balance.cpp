// Exact-equality tests of the stage balancing (csrc/scheduler/balance.cpp). Built and run
// by tests/test_scheduler.py, and by CMake as a ctest.
#include <cstdio>
#include <stdexcept>
#include <vector>

#include "../../csrc/scheduler/balance.h"

static int failures = 0;
#define EXPECT(cond)                                                  \
  do {                                                                \
    if (!(cond)) {                                                    \
      std::printf("FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                     \
    }                                                                 \
  } while (0)

int main() {
  using al_ext::scheduler::balanced_groups;
  EXPECT((balanced_groups({1, 1, 1, 1}, 2) == std::vector<int>{0, 2}));
  EXPECT((balanced_groups({1, 1, 1, 1}, 4) == std::vector<int>{0, 1, 2, 3}));
  EXPECT((balanced_groups({1, 1, 1, 1}, 8) == std::vector<int>{0, 1, 2, 3}));  // no empty group
  EXPECT((balanced_groups({5, 1, 1, 1, 1, 1}, 2) == std::vector<int>{0, 1}));   // a costly first bridge
  EXPECT((balanced_groups({1, 2, 3, 4, 5, 6, 7, 8, 9}, 3) == std::vector<int>{0, 5, 7}));  // 15 | 13 | 17
  EXPECT((balanced_groups({3, 1, 1, 1}, 1) == std::vector<int>{0}));
  bool threw = false;
  try {
    balanced_groups({}, 2);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  EXPECT(threw);
  std::printf("%s\n", failures ? "balance tests FAILED" : "balance tests passed");
  return failures ? 1 : 0;
}
