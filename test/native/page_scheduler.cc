// Unit tests of addon/page_scheduler: the order pages are yielded in
// (requested, window in units, working set, background following the last
// request) and each page once, with several threads claiming at once. Prints
// TAP lines; test/page-scheduler.test.ts runs it.
#include "../../addon/page_scheduler.h"

#include <algorithm>
#include <cstdio>
#include <random>
#include <string>
#include <thread>
#include <vector>

using namespace uffdpc;

namespace {

int failures = 0, count = 0;

void Check(bool ok, const std::string& what) {
  count++;
  if (!ok) failures++;
  std::printf("%s %d - %s\n", ok ? "ok" : "not ok", count, what.c_str());
}

std::string Show(const PageRuns& runs) {
  static const char* names[] = {"requested", "window", "background", "working-set"};
  std::string s;
  for (const PageRun& r : runs) {
    uint32_t why = static_cast<uint32_t>(r.why);
    const char* name = why == wire::kRequested ? names[0] : why == wire::kWindow ? names[1] : why == wire::kBackground ? names[2] : names[3];
    s += " " + std::to_string(r.region) + ":[" + std::to_string(r.first) + "," + std::to_string(r.first + r.count) + ")" + name;
  }
  return s;
}

bool Same(const PageRuns& got, const PageRuns& want, const std::string& what) {
  bool ok = got.size() == want.size();
  for (size_t i = 0; ok && i < got.size(); i++)
    ok = got[i].region == want[i].region && got[i].first == want[i].first && got[i].count == want[i].count && got[i].why == want[i].why;
  Check(ok, what + (ok ? "" : " (got" + Show(got) + ", want" + Show(want) + ")"));
  return ok;
}

std::vector<uint64_t> Entries(uint32_t region, std::initializer_list<uint64_t> pages) {
  std::vector<uint64_t> out;
  for (uint64_t p : pages) out.push_back(static_cast<uint64_t>(region) << 48 | p);
  return out;
}

// Every run the scheduler yields until every page is claimed, background only.
PageRuns Drain(PageScheduler& s, uint64_t maxPages) {
  PageRuns out;
  PageRun run;
  while (!s.AllClaimed())
    if (s.NextBackgroundRun(maxPages, &run)) out.push_back(run);
  return out;
}

// Each page of every region exactly once across `runs` (plus `held`, claimed outside them).
bool EachOnce(const PageScheduler& s, const std::vector<PageRuns>& runs, uint64_t held = 0) {
  std::vector<std::vector<int>> seen(s.regions());
  for (uint32_t r = 0; r < s.regions(); r++) seen[r].assign(s.region(r).pages, 0);
  uint64_t total = 0;
  for (const PageRuns& list : runs)
    for (const PageRun& run : list)
      for (uint64_t p = run.first; p < run.first + run.count; p++) {
        seen[run.region][p]++;
        total++;
      }
  for (auto& region : seen)
    for (int n : region)
      if (n > 1) return false;
  return total + held == s.totalPages() && s.claimed() == s.totalPages();
}

void RequestedThenWindowThenWorkingSetThenBackground() {
  PageScheduler s({{64, 1, 8}}, {2, 3});
  s.AddWorkingSet(Entries(0, {30, 31, 29, 50, 12}));
  PageRuns runs;
  Check(s.Request(0, 30, 1, runs) == 0, "a page nobody claimed is claimed by its request");
  s.Around(0, 30, 1, UINT64_MAX, runs);
  Same(runs, {{0, 30, 1, Why::kRequested}, {0, 31, 2, Why::kWindow}, {0, 27, 3, Why::kWindow}},
       "requested, then the window forward, then backward (nearest first); the set's cluster lies inside the window");
  runs.clear();
  Check(s.Request(0, 50, 1, runs) == 0, "a second request");
  s.Around(0, 50, 1, UINT64_MAX, runs);
  Same(runs, {{0, 50, 1, Why::kRequested}, {0, 51, 2, Why::kWindow}, {0, 47, 3, Why::kWindow}}, "its window too");
  runs.clear();
  Check(s.Request(0, 31, 1, runs) == 1 && runs.empty(), "a page claimed already is reported as claimed before, and yields nothing");
  PageRun run;
  PageRuns set;
  while (s.NextWorkingSetRun(&run)) set.push_back(run);
  Same(set, {{0, 12, 1, Why::kWorkingSet}}, "the working set: only the entries not claimed yet, in its order");
  PageRun bg;
  Check(s.NextBackgroundRun(8, &bg) && bg.first == 33 && bg.count == 7 && bg.why == Why::kBackground,
        "the background goes on after the last request (31), from its next page not claimed, up to the next multiple of maxRun (40)");
  PageRuns rest = Drain(s, 8);
  Same(PageRuns(rest.begin(), rest.begin() + std::min<size_t>(4, rest.size())),
       {{0, 40, 7, Why::kBackground}, {0, 53, 3, Why::kBackground}, {0, 56, 8, Why::kBackground}, {0, 0, 8, Why::kBackground}},
       "a run ends where a claimed page begins, and on each multiple of maxRun (so runs cover aligned stretches whole); at the region's end it wraps round to "
       "the start");
  Check(EachOnce(s, {{{0, 30, 1, Why::kRequested}, {0, 31, 2, Why::kWindow}, {0, 27, 3, Why::kWindow}},
                     {{0, 50, 1, Why::kRequested}, {0, 51, 2, Why::kWindow}, {0, 47, 3, Why::kWindow}},
                     set,
                     {bg},
                     rest}),
        "every page yielded exactly once");
}

void WorkingSetClusterAroundARequest() {
  PageScheduler s({{256, 1, 16}}, {0, 0});
  s.AddWorkingSet(Entries(0, {100, 101, 102, 103, 98, 200}));
  PageRuns runs;
  s.Request(0, 101, 1, runs);
  s.Around(0, 101, 1, UINT64_MAX, runs);
  Same(runs, {{0, 101, 1, Why::kRequested}, {0, 100, 1, Why::kWorkingSet}, {0, 102, 2, Why::kWorkingSet}},
       "a request inside the set brings the set's pages contiguous to it (not its isolated ones)");
  runs.clear();
  s.Request(0, 5, 1, runs);
  s.Around(0, 5, 1, UINT64_MAX, runs);
  Same(runs, {{0, 5, 1, Why::kRequested}}, "a request outside the set brings nothing of it");
  PageRun run;
  PageRuns set;
  while (s.NextWorkingSetRun(&run)) set.push_back(run);
  Same(set, {{0, 98, 1, Why::kWorkingSet}, {0, 200, 1, Why::kWorkingSet}}, "the rest of the set, in its order");
}

void ClusterOfTheSetOnItsOwn() {
  PageScheduler s({{64, 1, 4}}, {0, 0});
  s.AddWorkingSet(Entries(0, {10, 11, 12, 13, 14, 9, 8}));
  PageRun run;
  PageRuns set;
  while (s.NextWorkingSetRun(&run)) set.push_back(run);
  Same(set, {{0, 10, 4, Why::kWorkingSet}, {0, 14, 1, Why::kWorkingSet}, {0, 8, 2, Why::kWorkingSet}},
       "each entry with the set's pages after it, then before it, at most maxRun, each page once");
}

void HugePageUnits() {
  // 8 pages a unit (a huge page of small pages), 16 pages a run.
  PageScheduler s({{128, 8, 16}}, {2, 1});
  PageRuns runs;
  Check(s.Request(0, 43, 1, runs) == 0, "a request claims its whole unit");
  s.Around(0, 43, 1, UINT64_MAX, runs);
  Same(runs, {{0, 40, 8, Why::kRequested}, {0, 48, 16, Why::kWindow}, {0, 32, 8, Why::kWindow}}, "the window in whole units: two after, one before");
  runs.clear();
  Check(s.Request(0, 47, 1, runs) == 8 && runs.empty(), "another page of a claimed unit: the unit was claimed before");
  s.Around(0, 120, 1, UINT64_MAX, runs);
  Same(runs, {{0, 112, 8, Why::kWindow}}, "at the region's end the window stops there");
  runs.clear();
  s.Around(0, 3, 1, UINT64_MAX, runs);
  Same(runs, {{0, 8, 16, Why::kWindow}}, "at its start, no unit before page 0");
  s.AddWorkingSet(Entries(0, {90, 91, 42}));
  PageRun run;
  PageRuns set;
  while (s.NextWorkingSetRun(&run)) set.push_back(run);
  Same(set, {{0, 88, 8, Why::kWorkingSet}}, "a working-set entry brings its whole unit, once");
  PageRuns rest = Drain(s, 64);
  bool whole = true;
  for (const PageRun& r : rest) whole = whole && r.first % 8 == 0 && r.count % 8 == 0 && r.count <= 16;
  Check(whole, "the background claims whole units, at most a run");
}

void RoomLimitsWhatGoesBesideTheRequest() {
  PageScheduler s({{64, 1, 8}}, {4, 4});
  PageRuns runs;
  s.Request(0, 20, 1, runs);
  s.Around(0, 20, 1, 5, runs);
  Same(runs, {{0, 20, 1, Why::kRequested}, {0, 21, 4, Why::kWindow}, {0, 19, 1, Why::kWindow}}, "a room of 5: the requested page, then 5 of the window");
  runs.clear();
  s.Request(0, 40, 1, runs);
  s.Around(0, 40, 1, 0, runs);
  Same(runs, {{0, 40, 1, Why::kRequested}}, "no room: the requested page still goes");
}

void BackgroundFollowsTheLastRequest() {
  PageScheduler s({{32, 1, 4}, {32, 1, 4}, {32, 1, 4}}, {0, 0});
  PageRun run;
  Check(s.NextBackgroundRun(4, &run) && run.region == 0 && run.first == 0 && run.count == 4, "with no request, the background starts at the start");
  PageRuns runs;
  s.Request(1, 10, 1, runs);
  Check(s.NextBackgroundRun(4, &run) && run.region == 1 && run.first == 11, "after a request, it goes on from the page after it");
  s.Request(2, 30, 2, runs);  // the last two pages of region 2
  Check(s.NextBackgroundRun(4, &run) && run.region == 0 && run.first == 4,
        "past a region's end: the next region (wrapping round), from its first page not claimed");
  PageRuns rest = Drain(s, 4);
  std::vector<uint32_t> order;
  for (const PageRun& r : rest)
    if (order.empty() || order.back() != r.region) order.push_back(r.region);
  Check(order == std::vector<uint32_t>({0, 1, 2}), "then region after region");
  Check(s.AllClaimed() && !s.NextBackgroundRun(4, &run), "none once every page is claimed");
}

void HeldPagesAreNeverYielded() {
  PageScheduler s({{16, 1, 16}}, {1, 1});
  for (uint64_t p = 0; p < 16; p += 2) s.Claim(0, p);
  Check(!s.Claim(0, 0), "a page claims once");
  PageRuns runs;
  Check(s.Request(0, 4, 1, runs) == 1 && runs.empty(), "a held page asked for: claimed before");
  s.Around(0, 4, 1, UINT64_MAX, runs);
  Same(runs, {{0, 5, 1, Why::kWindow}, {0, 3, 1, Why::kWindow}}, "its window: only what is not held");
  PageRuns rest = Drain(s, 16);
  Check(EachOnce(s, {runs, rest}, 8), "the background sends the rest, never a held page");
}

void TheRequestQueue() {
  PageScheduler s({{16, 1, 16}}, {0, 0});
  Check(!s.HasWork(), "nothing to do at first");
  s.Queue({0, 3, 2, 7});
  s.Queue({0, 9, 1, 8});
  QueuedRequest r{};
  Check(s.HasWork() && s.TakeRequest(&r) && r.first == 3 && r.count == 2 && r.atNs == 7, "requests come out in order");
  Check(s.TakeRequest(&r) && r.first == 9 && !s.TakeRequest(&r) && !s.HasWork(), "each once");
  Check(!s.AddWorkingSet(Entries(0, {3, 16})) && s.WorkingSetSize() == 0, "a working set with a page outside is refused whole");
  Check(!s.AddWorkingSet(Entries(1, {0})), "so is one naming a region that does not exist");
}

// A request thread and a bulk thread (working set, then background) claim at
// once; a third asks for whole ranges (QEMU). Every page goes exactly once.
void ConcurrentClaimers() {
  for (int round = 0; round < 20; round++) {
    PageScheduler s({{4096, 1, 64}, {2048, 8, 64}}, {3, 2});
    std::mt19937_64 rng(round);
    std::vector<uint64_t> set;
    for (int i = 0; i < 1500; i++) {
      uint32_t region = rng() % 2;
      set.push_back(static_cast<uint64_t>(region) << 48 | rng() % (region ? 2048 : 4096));
    }
    s.AddWorkingSet(set);
    PageRuns requested, ranged, bulk;
    std::thread requests([&] {
      std::mt19937_64 r(round + 1000);
      PageRuns runs;
      for (int i = 0; i < 3000; i++) {
        uint32_t region = r() % 2;
        uint64_t page = r() % (region ? 2048 : 4096);
        runs.clear();
        s.Request(region, page, 1, runs);
        s.Around(region, page, 1, UINT64_MAX, runs);
        requested.insert(requested.end(), runs.begin(), runs.end());
      }
    });
    std::thread ranges([&] {
      std::mt19937_64 r(round + 2000);
      PageRuns runs;
      for (int i = 0; i < 500; i++) {
        uint64_t page = r() % 4000;
        runs.clear();
        s.Request(0, page, 1 + r() % 90, runs);
        s.Around(0, page, 1, 7, runs);
        ranged.insert(ranged.end(), runs.begin(), runs.end());
      }
    });
    std::thread background([&] {
      PageRun run;
      while (s.NextWorkingSetRun(&run)) bulk.push_back(run);
      while (!s.AllClaimed())
        if (s.NextBackgroundRun(64, &run)) bulk.push_back(run);
    });
    requests.join();
    ranges.join();
    background.join();
    if (!EachOnce(s, {requested, ranged, bulk})) {
      Check(false, "concurrent claimers, round " + std::to_string(round) + ": a page went twice or not at all");
      return;
    }
  }
  Check(true, "three threads claiming at once (requests, ranges, working set and background), 20 rounds: every page exactly once");
}

}  // namespace

int main() {
  std::printf("TAP version 13\n");
  RequestedThenWindowThenWorkingSetThenBackground();
  WorkingSetClusterAroundARequest();
  ClusterOfTheSetOnItsOwn();
  HugePageUnits();
  RoomLimitsWhatGoesBesideTheRequest();
  BackgroundFollowsTheLastRequest();
  HeldPagesAreNeverYielded();
  TheRequestQueue();
  ConcurrentClaimers();
  std::printf("1..%d\n", count);
  return failures ? 1 : 0;
}
