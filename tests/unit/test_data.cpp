// The data pipeline: UTF-8 validation, the plain-text and JSONL readers, ANSI stripping, the
// held-out split, packing at document boundaries, shuffling, batching and exact resume.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "kept/train/data.hpp"
#include "support/errors.hpp"
#include "support/files.hpp"

using namespace kept;
using namespace kept::test;
using Catch::Contains;

namespace {

using Docs = std::vector<std::string>;

// Document d's token j is 100 * (d + 1) + j: every token names its document and position, and
// none is the EOS (0).
constexpr std::int32_t kEos = 0;
std::vector<TokenDocument> numbered_documents(const std::vector<int>& lengths) {
  std::vector<TokenDocument> docs;
  for (std::size_t d = 0; d < lengths.size(); ++d) {
    TokenDocument doc;
    for (int j = 0; j < lengths[d]; ++j)
      doc.push_back(static_cast<std::int32_t>(100 * (d + 1) + j));
    docs.push_back(doc);
  }
  return docs;
}
int document_of(std::int32_t token) {
  return token / 100 - 1;
}

bool same_batch(const Batch& a, const Batch& b) {
  return a.inputs == b.inputs && a.targets == b.targets && a.epoch == b.epoch &&
         a.windows == b.windows;
}

}  // namespace

// ---- text ------------------------------------------------------------------------------------

TEST_CASE("UTF-8 validation finds the first bad sequence with its offset and line",
          "[data][text]") {
  CHECK_FALSE(find_invalid_utf8("plain ASCII\n").has_value());
  CHECK_FALSE(find_invalid_utf8("gr\xC3\xBC\xC3\x9F \xE4\xB8\xAD\xE6\x96\x87 \xF0\x9F\x98\x80 "
                                "\xED\x9F\xBF \xEE\x80\x80 \xF4\x8F\xBF\xBF")
                  .has_value());  // ü ß 中文 😀 U+D7FF U+E000 U+10FFFF
  struct Case {
    std::string text;
    std::size_t offset, line;
    std::string reason;
  };
  const std::vector<Case> cases = {
      {"ab\xFF", 2, 1, "0xff never appears"},
      {"a\nb\n\x80", 4, 3, "continuation byte without a lead"},
      {"\xC0\x80", 0, 1, "overlong"},
      {"x\xE0\x80\x80", 1, 1, "cannot follow the lead byte 0xe0"},     // overlong 3-byte
      {"\xED\xA0\x80", 0, 1, "cannot follow the lead byte 0xed"},      // a surrogate
      {"\xF4\x90\x80\x80", 0, 1, "cannot follow the lead byte 0xf4"},  // above U+10FFFF
      {"\xF5\x80\x80\x80", 0, 1, "never appears"},
      {"ok\n\xE4\xB8", 3, 2, "ends inside a 3-byte sequence"},  // truncated
      {"\xE4\xB8"
       "a",
       0, 1, "byte 0x61 at offset 2 cannot follow the bytes before it"},
  };
  for (const Case& c : cases) {
    INFO(nlohmann::json(c.text).dump(-1, ' ', true, nlohmann::json::error_handler_t::replace));
    auto problem = find_invalid_utf8(c.text);
    REQUIRE(problem.has_value());
    CHECK(problem->offset == c.offset);
    CHECK(problem->line == c.line);
    CHECK_THAT(problem->reason, Contains(c.reason));
  }
}

TEST_CASE(
    "strip_ansi_escapes removes CSI escape sequences (ESC, bracket, digits, letter) and nothing "
    "else",
    "[data][text]") {
  CHECK(strip_ansi_escapes("\x1b[1;31mred\x1b[0m plain \x1b[m.") == "red plain .");
  CHECK(strip_ansi_escapes("\x1b[2J\x1b[10;20Hcursor") == "cursor");
  CHECK(strip_ansi_escapes("\xE4\xB8\xAD\x1b[32m\xE6\x96\x87\x1b[0m") ==
        "\xE4\xB8\xAD\xE6\x96\x87");
  // Not the pattern: kept as is.
  CHECK(strip_ansi_escapes("\x1b"
                           "X \x1b[12") ==
        "\x1b"
        "X \x1b[12");
  CHECK(strip_ansi_escapes("\x1b[1;2?x") == "\x1b[1;2?x");
  CHECK(strip_ansi_escapes("") == "");
}

TEST_CASE("plain text: documents separated by blank lines, nothing else changed", "[data][text]") {
  CHECK(split_plain_text_documents("one\nline two\n\nthree\n", "t") ==
        Docs{"one\nline two", "three"});
  CHECK(split_plain_text_documents("\n\n  a  \n \t \n\n\nb\r\n\r\nc", "t") ==
        Docs{"  a  ", "b\r", "c"});
  CHECK(split_plain_text_documents("\xEF\xBB\xBFwith BOM\n", "t") == Docs{"with BOM"});
  CHECK(split_plain_text_documents("no newline at end", "t") == Docs{"no newline at end"});

  TempDir dir("kept-data");
  const auto good =
      write_file(dir / "good.txt", "In the beginning\nGod created\n\nAnd the earth\n");
  CHECK(read_plain_text_documents(good) == Docs{"In the beginning\nGod created", "And the earth"});

  SECTION("an empty corpus names the file") {
    for (std::string text : {"", "\n\n", "  \n\t\n"}) {
      const auto path = write_file(dir / "empty.txt", text);
      CHECK_THAT(error_of([&] { read_plain_text_documents(path); }),
                 Contains(path.string()) && Contains("empty"));
    }
  }
  SECTION("invalid UTF-8 names the file, the byte offset and the line") {
    const auto path = write_file(dir / "latin1.txt", "first\n\nna\xEFve\n");
    CHECK_THAT(error_of([&] { read_plain_text_documents(path); }),
               Contains(path.string()) && Contains("invalid UTF-8 at byte offset 9") &&
                   Contains("line 3"));
  }
  SECTION("a missing file") {
    CHECK_THAT(error_of([&] { read_plain_text_documents(dir / "nope.txt"); }),
               Contains("nope.txt") && Contains("No such file"));
  }
}

TEST_CASE("JSONL: one object with a text string per line", "[data][text]") {
  TempDir dir("kept-data");
  const auto good =
      write_file(dir / "good.jsonl",
                 "{\"text\": \"first \\u00fc\\n doc\", \"meta\": {\"source\": [1, 2]}}\n"
                 "\n"
                 "   \n"
                 "{\"id\": 3, \"text\": \"\\u4e2d\\u6587 \xF0\x9F\x98\x80\"}\r\n"
                 "{\"text\": \"\"}\n"
                 "{\"text\": \"last, no newline\"}");
  CHECK(read_jsonl_documents(good) == Docs{"first \xC3\xBC\n doc",
                                           "\xE4\xB8\xAD\xE6\x96\x87 \xF0\x9F\x98\x80",
                                           "last, no newline"});
  CHECK(parse_jsonl_documents("{\"body\": \"x\"}\n", "t", "body") == Docs{"x"});

  struct Bad {
    std::string text;
    std::vector<std::string> expected;
  };
  const std::vector<Bad> bad = {
      {"{\"text\": \"a\"}\n[1, 2]\n", {": line 2", "expected a JSON object", "an array of 2"}},
      {"{\"text\": \"a\"}\n\n{\"body\": \"b\"}\n", {": line 3", "no \"text\" field"}},
      {"{\"text\": 5}\n", {": line 1", "\"text\" is number 5", "expected a string"}},
      {"{\"text\": \"a\"}\n{\"text\": \"b\"\n", {": line 2", "not valid JSON"}},
      {"{\"text\": \"a\", \"text\": \"b\"}\n", {": line 1", "duplicate"}},
      {"{\"text\": \"\\ud800\"}\n", {": line 1", "not valid JSON"}},  // a lone surrogate
      {"", {"empty", "no record"}},
      {"\n  \n", {"empty", "no record"}},
      {"{\"text\": \"\"}\n", {"empty", "empty string"}},
      {"{\"text\": \"ok\"}\n{\"text\": \"caf\xE9\"}\n",
       {"invalid UTF-8 at byte offset 28", "line 2"}},
  };
  for (const Bad& b : bad) {
    INFO(b.text);
    const auto path = write_file(dir / "bad.jsonl", b.text);
    const std::string message = error_of([&] { read_jsonl_documents(path); });
    CHECK_THAT(message, Contains(path.string()));
    for (const std::string& part : b.expected)
      CHECK_THAT(message, Contains(part));
  }
}

// ---- split, packing, shuffling ---------------------------------------------------------------

TEST_CASE("held-out split: whole documents, deterministic by seed", "[data][split]") {
  const DocumentSplit a = split_documents(10, 0.25, 7);
  CHECK(a.held_out.size() == 3);  // round(2.5) = 3
  CHECK(a.train.size() == 7);
  std::set<std::size_t> all(a.train.begin(), a.train.end());
  all.insert(a.held_out.begin(), a.held_out.end());
  CHECK(all.size() == 10);
  CHECK(std::is_sorted(a.train.begin(), a.train.end()));
  CHECK(std::is_sorted(a.held_out.begin(), a.held_out.end()));
  const DocumentSplit again = split_documents(10, 0.25, 7);
  CHECK(again.held_out == a.held_out);
  bool differs = false;
  for (std::uint64_t seed = 8; seed < 16; ++seed)
    differs |= split_documents(10, 0.25, seed).held_out != a.held_out;
  CHECK(differs);
  CHECK(split_documents(10, 0.0, 7).held_out.empty());
  CHECK(split_documents(10, 0.01, 7).held_out.size() == 1);  // > 0 holds out at least one
  CHECK_THAT(error_of([] { split_documents(1, 0.5, 7); }), Contains("leaves none"));
  CHECK_THAT(error_of([] { split_documents(10, 1.0, 7); }), Contains("[0, 1)"));
}

TEST_CASE("Fisher-Yates shuffle is a deterministic permutation", "[data][split]") {
  std::vector<int> items(50);
  for (int i = 0; i < 50; ++i)
    items[static_cast<std::size_t>(i)] = i;
  std::vector<int> a = items, b = items, c = items;
  Random ra(3), rb(3), rc(4);
  shuffle_in_place(a, ra);
  shuffle_in_place(b, rb);
  shuffle_in_place(c, rc);
  CHECK(a == b);
  CHECK(a != c);
  CHECK(a != items);
  std::sort(a.begin(), a.end());
  CHECK(a == items);
  // The exact first draws, so a change in the algorithm cannot pass unnoticed.
  std::vector<int> small = {0, 1, 2, 3};
  Random r(0);
  shuffle_in_place(small, r);
  Random check(0);
  std::vector<int> manual = {0, 1, 2, 3};
  for (std::size_t i = 4; i > 1; --i)
    std::swap(manual[i - 1], manual[check.next_u64() % i]);
  CHECK(small == manual);
}

TEST_CASE("packing: EOS after every document, targets shifted by one", "[data][packing]") {
  // Stream: 100 101 102 EOS | 200 EOS | EOS (empty doc) | 400 401 402 403 404 EOS = 13 tokens.
  auto docs = std::make_shared<const std::vector<TokenDocument>>(numbered_documents({3, 1, 0, 5}));
  const std::vector<std::int32_t> stream = {100, 101, 102, 0,   200, 0, 0,
                                            400, 401, 402, 403, 404, 0};
  SECTION("Drop: (T - 1) / L full windows, consecutive windows share one token") {
    PackedStream packed(docs, {0, 1, 2, 3}, kEos, 4, Remainder::Drop);
    CHECK(packed.tokens() == 13);
    CHECK(packed.sequences() == 3);  // (13 - 1) / 4
    for (std::int64_t p = 0; p < 13; ++p)
      CHECK(packed.token(p) == stream[static_cast<std::size_t>(p)]);
    std::vector<std::int32_t> in(4), tg(4);
    packed.sequence(0, in, tg);
    CHECK(in == std::vector<std::int32_t>{100, 101, 102, 0});
    CHECK(tg == std::vector<std::int32_t>{101, 102, 0, 200});
    packed.sequence(1, in, tg);
    CHECK(in == std::vector<std::int32_t>{200, 0, 0, 400});
    CHECK(tg == std::vector<std::int32_t>{0, 0, 400, 401});
    packed.sequence(2, in, tg);
    CHECK(in == std::vector<std::int32_t>{401, 402, 403, 404});
    CHECK(tg == std::vector<std::int32_t>{402, 403, 404, 0});
    CHECK_THAT(error_of([&] { packed.sequence(3, in, tg); }), Contains("out of range"));
  }
  SECTION("Drop loses the tail of fewer than L targets") {
    PackedStream packed(docs, {0, 1, 2, 3}, kEos, 5, Remainder::Drop);
    CHECK(packed.sequences() == 2);  // (13 - 1) / 5: targets 1..10 kept, 11..12 dropped
    std::vector<std::int32_t> in(5), tg(5);
    packed.sequence(1, in, tg);
    CHECK(in == std::vector<std::int32_t>{0, 0, 400, 401, 402});
    CHECK(tg == std::vector<std::int32_t>{0, 400, 401, 402, 403});  // 404 and its EOS dropped
  }
  SECTION("Pad: one more window, inputs padded with EOS, targets -1") {
    PackedStream packed(docs, {0, 1, 2, 3}, kEos, 5, Remainder::Pad);
    CHECK(packed.sequences() == 3);
    std::vector<std::int32_t> in(5), tg(5);
    packed.sequence(2, in, tg);
    CHECK(in == std::vector<std::int32_t>{403, 404, 0, 0, 0});  // the last two are padding
    CHECK(tg == std::vector<std::int32_t>{404, 0, -1, -1, -1});
    // An exact fit adds no padded window.
    PackedStream exact(docs, {0, 1, 2, 3}, kEos, 4, Remainder::Pad);
    CHECK(exact.sequences() == 3);
  }
  SECTION("the order given is the order packed") {
    PackedStream packed(docs, {3, 1}, kEos, 2, Remainder::Drop);
    CHECK(packed.tokens() == 8);
    std::vector<std::int32_t> in(2), tg(2);
    packed.sequence(2, in, tg);
    CHECK(in == std::vector<std::int32_t>{404, 0});
    CHECK(tg == std::vector<std::int32_t>{0, 200});
  }
}

TEST_CASE("loader: an epoch covers every window once and held-out documents never appear",
          "[data][loader]") {
  // 30 documents of 0..12 tokens; seq_len 7, batch 3.
  std::vector<int> lengths;
  for (int d = 0; d < 30; ++d)
    lengths.push_back((d * 7) % 13);
  const auto docs = numbered_documents(lengths);
  for (Remainder remainder : {Remainder::Drop, Remainder::Pad}) {
    DataConfig config{.seq_len = 7,
                      .batch_size = 3,
                      .eos_id = kEos,
                      .seed = 11,
                      .held_out_fraction = 0.2,
                      .remainder = remainder};
    DataLoader loader(docs, config);
    INFO("remainder " << (remainder == Remainder::Drop ? "drop" : "pad"));
    CHECK(loader.split().held_out.size() == 6);
    const std::set<std::size_t> held(loader.split().held_out.begin(),
                                     loader.split().held_out.end());
    const std::int64_t windows = loader.sequences_per_epoch();
    const std::int64_t per_epoch = loader.batches_per_epoch();
    CHECK(per_epoch == windows / 3);

    for (std::int64_t epoch = 0; epoch < 3; ++epoch) {
      const PackedStream stream = loader.stream_for_epoch(epoch);
      // Every training document appears in the epoch's stream exactly once.
      std::vector<std::size_t> order = stream.order();
      std::sort(order.begin(), order.end());
      CHECK(order == loader.split().train);
      std::multiset<std::int64_t> seen_windows;
      std::map<std::int64_t, std::int32_t> targets_at;  // stream position -> target
      for (std::int64_t b = 0; b < per_epoch; ++b) {
        const Batch batch = loader.next_batch();
        REQUIRE(batch.epoch == epoch);
        REQUIRE(batch.batch == 3);
        REQUIRE(batch.seq == 7);
        for (std::int64_t r = 0; r < 3; ++r) {
          const std::int64_t w = batch.windows[static_cast<std::size_t>(r)];
          seen_windows.insert(w);
          for (std::int64_t t = 0; t < 7; ++t) {
            const std::size_t i = static_cast<std::size_t>(r * 7 + t);
            const std::int32_t input = batch.inputs[i], target = batch.targets[i];
            const std::int64_t pos = w * 7 + t;
            if (target != kIgnoreTarget) {
              // Shifted by one: the target is the stream's next token.
              CHECK(target == stream.token(pos + 1));
              CHECK(input == stream.token(pos));
              CHECK(targets_at.emplace(pos + 1, target).second);  // never twice
              // EOS exactly after a document's last token; after EOS a document starts.
              if (input != kEos) {
                const int d = document_of(input);
                const bool last = input - 100 * (d + 1) == lengths[static_cast<std::size_t>(d)] - 1;
                CHECK((target == kEos) == last);
              }
              if (input == kEos && target != kEos) CHECK(target % 100 == 0);
            }
            for (std::int32_t token : {input, target})
              if (token > 0) CHECK(held.count(static_cast<std::size_t>(document_of(token))) == 0);
          }
        }
      }
      // Each window at most once; the windows not served are fewer than a batch.
      CHECK(std::set<std::int64_t>(seen_windows.begin(), seen_windows.end()).size() ==
            seen_windows.size());
      CHECK(windows - static_cast<std::int64_t>(seen_windows.size()) < 3);
      // With every window served (add the skipped ones), every stream token from position 1 on
      // is a target exactly once: none lost, none duplicated (Pad), or all but the tail (Drop).
      for (std::int64_t w = 0; w < windows; ++w) {
        if (seen_windows.count(w)) continue;
        std::vector<std::int32_t> in(7), tg(7);
        stream.sequence(w, in, tg);
        for (std::int64_t t = 0; t < 7; ++t)
          if (tg[static_cast<std::size_t>(t)] != kIgnoreTarget)
            CHECK(targets_at.emplace(w * 7 + t + 1, tg[static_cast<std::size_t>(t)]).second);
      }
      const std::int64_t covered = remainder == Remainder::Pad ? stream.tokens() - 1 : windows * 7;
      CHECK(static_cast<std::int64_t>(targets_at.size()) == covered);
      CHECK(targets_at.begin()->first == 1);
      CHECK(targets_at.rbegin()->first == covered);
      if (remainder == Remainder::Pad) {
        // Every token of every training document, and each EOS, is a target once, except the
        // stream's first token.
        std::multiset<std::int32_t> expected;
        for (std::size_t d : stream.order()) {
          expected.insert(docs[d].begin(), docs[d].end());
          expected.insert(kEos);
        }
        expected.erase(expected.find(stream.token(0)));
        std::multiset<std::int32_t> got;
        for (const auto& [pos, token] : targets_at)
          got.insert(token);
        CHECK(got == expected);
      }
    }
    // Epochs differ in document order and in window order.
    CHECK(loader.stream_for_epoch(0).order() != loader.stream_for_epoch(1).order());
    CHECK(loader.window_order(0) != loader.window_order(1));

    // Held-out: packed in corpus order with padding; every held-out token is a target.
    const std::vector<Batch> eval = loader.held_out_batches();
    std::multiset<std::int32_t> eval_targets;
    for (const Batch& b : eval) {
      CHECK(b.batch <= 3);
      for (std::int32_t t : b.targets)
        if (t != kIgnoreTarget) eval_targets.insert(t);
      for (std::int32_t t : b.inputs)
        if (t > 0) CHECK(held.count(static_cast<std::size_t>(document_of(t))) == 1);
    }
    std::size_t held_tokens = 0;
    for (std::size_t d : loader.split().held_out)
      held_tokens += docs[d].size() + 1;
    CHECK(eval_targets.size() == held_tokens - 1);
  }
}

TEST_CASE("loader: the same seed gives the same batches, another seed another order",
          "[data][loader]") {
  std::vector<int> lengths(40, 0);
  for (int d = 0; d < 40; ++d)
    lengths[static_cast<std::size_t>(d)] = 3 + d % 9;
  const auto docs = numbered_documents(lengths);
  DataConfig config{
      .seq_len = 8, .batch_size = 2, .eos_id = kEos, .seed = 5, .held_out_fraction = 0.1};
  DataLoader a(docs, config), b(docs, config);
  config.seed = 6;
  DataLoader c(docs, config);
  bool differs = false;
  for (int i = 0; i < 60; ++i) {  // across several epochs
    const Batch x = a.next_batch(), y = b.next_batch(), z = c.next_batch();
    CHECK(same_batch(x, y));
    differs |= !same_batch(x, z);
  }
  CHECK(differs);
  CHECK(a.state() == b.state());
  CHECK(a.state().epoch >= 2);

  SECTION("shuffle off: corpus order, windows in order") {
    DataConfig plain{.seq_len = 8, .batch_size = 2, .eos_id = kEos, .shuffle = false};
    DataLoader loader(docs, plain);
    const Batch first = loader.next_batch();
    CHECK(first.windows == std::vector<std::int64_t>{0, 1});
    CHECK(std::vector<std::int32_t>(first.inputs.begin(), first.inputs.begin() + 5) ==
          std::vector<std::int32_t>{100, 101, 102, 0, 200});
  }
}

TEST_CASE("loader: resuming from any position gives the same subsequent batches",
          "[data][loader][resume]") {
  std::vector<int> lengths;
  for (int d = 0; d < 25; ++d)
    lengths.push_back(1 + (d * 5) % 11);
  const auto docs = numbered_documents(lengths);
  const DataConfig config{
      .seq_len = 6, .batch_size = 4, .eos_id = kEos, .seed = 99, .held_out_fraction = 0.1};
  DataLoader reference(docs, config);
  const std::int64_t total = 3 * reference.batches_per_epoch() + 2;  // crosses two epoch ends
  std::vector<LoaderState> states;
  std::vector<Batch> batches;
  for (std::int64_t i = 0; i < total; ++i) {
    states.push_back(reference.state());
    batches.push_back(reference.next_batch());
  }
  for (std::size_t k = 0; k < states.size(); ++k) {
    INFO("resumed before batch " << k);
    // Through JSON text, as trainer.json stores it.
    const std::string text = states[k].to_json().dump();
    const LoaderState parsed = LoaderState::from_json(nlohmann::json::parse(text), "state");
    CHECK(parsed == states[k]);
    DataLoader resumed(docs, config);
    resumed.restore(parsed);
    for (std::size_t j = k; j < batches.size(); ++j)
      REQUIRE(same_batch(resumed.next_batch(), batches[j]));
    CHECK(resumed.state() == reference.state());
  }

  SECTION("a state from another corpus or configuration is refused") {
    auto other_docs = docs;
    other_docs[3].push_back(7);
    DataLoader other(other_docs, config);
    CHECK_THAT(error_of([&] { other.restore(states[2], "run/trainer.json"); }),
               Contains("run/trainer.json") && Contains("fingerprint"));
    DataConfig longer = config;
    longer.seq_len = 7;
    DataLoader different(docs, longer);
    CHECK_THAT(error_of([&] { different.restore(states[2]); }), Contains("fingerprint"));
    DataConfig reseeded = config;
    reseeded.seed = 100;
    DataLoader seeded(docs, reseeded);
    LoaderState state = states[2];
    state.fingerprint = seeded.fingerprint();
    CHECK_THAT(error_of([&] { seeded.restore(state); }), Contains("seed 99"));
    state = states[2];
    state.position = reference.sequences_per_epoch() + 1;
    DataLoader same(docs, config);
    CHECK_THAT(error_of([&] { same.restore(state); }), Contains("outside"));
  }
  SECTION("malformed JSON states are refused, naming the field") {
    nlohmann::json json = states[1].to_json();
    json.erase("epoch");
    CHECK_THAT(error_of([&] { LoaderState::from_json(json, "w"); }), Contains("\"epoch\""));
    json = states[1].to_json();
    json["position"] = -1;
    CHECK_THAT(error_of([&] { LoaderState::from_json(json, "w"); }),
               Contains("\"position\"") && Contains(">= 0"));
    json = states[1].to_json();
    json["fingerprint"] = "xyz";
    CHECK_THAT(error_of([&] { LoaderState::from_json(json, "w"); }), Contains("fingerprint"));
    json = states[1].to_json();
    json["seed"] = 1.5;
    CHECK_THAT(error_of([&] { LoaderState::from_json(json, "w"); }), Contains("\"seed\""));
  }
}

TEST_CASE("loader: skipping batches (a data-parallel rank) keeps the place of reading them",
          "[data][loader]") {
  std::vector<int> lengths;
  for (int d = 0; d < 25; ++d)
    lengths.push_back(1 + (d * 7) % 13);
  const auto docs = numbered_documents(lengths);
  const DataConfig config{
      .seq_len = 5, .batch_size = 3, .eos_id = kEos, .seed = 4, .held_out_fraction = 0.1};
  DataLoader reader(docs, config), rank1(docs, config), rank2(docs, config);
  const std::int64_t total = 2 * reader.batches_per_epoch() + 3;  // crosses two epoch ends
  for (std::int64_t i = 0; i < total; ++i) {
    INFO("batch " << i);
    const Batch batch = reader.next_batch();
    // Rank 1 of 2 reads the odd batches, rank 2 of 3 every third; each skips the rest.
    if (i % 2 == 1)
      REQUIRE(same_batch(rank1.next_batch(), batch));
    else
      rank1.skip_batch();
    if (i % 3 == 2)
      REQUIRE(same_batch(rank2.next_batch(), batch));
    else
      rank2.skip_batch();
    REQUIRE(rank1.state() == reader.state());
    REQUIRE(rank2.state() == reader.state());
  }
  CHECK(reader.state().epoch == 2);
}

TEST_CASE("loader: configuration and corpus errors", "[data][loader]") {
  const auto docs = numbered_documents({3, 4, 5});
  CHECK_THAT(
      error_of([&] { DataLoader l(docs, {.seq_len = 100, .batch_size = 1, .eos_id = kEos}); }),
      Contains("fewer than one batch"));
  CHECK_THAT(error_of([&] { DataLoader l(docs, {.seq_len = 2, .batch_size = 1}); }),
             Contains("eos_id"));
  CHECK_THAT(error_of([&] { DataLoader l({}, {.seq_len = 2, .batch_size = 1, .eos_id = 0}); }),
             Contains("no documents"));
  auto negative = docs;
  negative[1][2] = -5;
  CHECK_THAT(
      error_of([&] { DataLoader l(negative, {.seq_len = 2, .batch_size = 1, .eos_id = 0}); }),
      Contains("document 1 token 2 is -5"));
  CHECK_THAT(error_of([&] {
               DataLoader l(docs, {.seq_len = 2, .batch_size = 1, .eos_id = 0, .vocab_size = 300});
             }),
             Contains("document 2 token 0 is 300") && Contains("[0, 300)"));
}
