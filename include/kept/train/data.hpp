// kept/train/data.hpp: from raw text files to resumable batches of packed token sequences, in
// three steps, one header each:
//   kept/train/text_input.hpp  plain text and JSONL files to documents (UTF-8 validated);
//   kept/train/packing.hpp     the held-out split, and token documents packed into windows;
//   kept/train/loader.hpp      shuffled, resumable batches of windows, epoch after epoch.
// Tokenising (SentencePiece) happens between the first two, in the caller.
#pragma once

#include "kept/train/loader.hpp"
#include "kept/train/packing.hpp"
#include "kept/train/text_input.hpp"
