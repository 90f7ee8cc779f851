#include "balance.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>

namespace al_ext::scheduler {
std::vector<int> balanced_groups(const std::vector<double>& costs, int workers) {
  const int n = static_cast<int>(costs.size());
  if (n == 0) throw std::invalid_argument("costs must hold one cost per block, got none");
  if (workers < 1) throw std::invalid_argument("workers must be at least 1, got " + std::to_string(workers));
  for (double c : costs) {
    if (!(c >= 0)) throw std::invalid_argument("every block cost must be a non-negative number");
  }
  const int k = std::min(workers, n);
  std::vector<double> prefix(n + 1, 0.0);
  for (int i = 0; i < n; ++i) prefix[i + 1] = prefix[i] + costs[i];
  // best[g][i]: the least possible costliest group when blocks 0..i-1 form g groups.
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<std::vector<double>> best(k + 1, std::vector<double>(n + 1, inf));
  std::vector<std::vector<int>> split(k + 1, std::vector<int>(n + 1, 0));
  best[0][0] = 0.0;
  for (int g = 1; g <= k; ++g) {
    for (int i = g; i <= n; ++i) {
      for (int j = g - 1; j < i; ++j) {  // the last group is blocks j..i-1
        const double worst = std::max(best[g - 1][j], prefix[i] - prefix[j]);
        if (worst < best[g][i]) {
          best[g][i] = worst;
          split[g][i] = j;
        }
      }
    }
  }
  std::vector<int> starts(k);
  for (int g = k, i = n; g >= 1; --g) {
    starts[g - 1] = split[g][i];
    i = split[g][i];
  }
  return starts;
}

}  // namespace al_ext::scheduler
