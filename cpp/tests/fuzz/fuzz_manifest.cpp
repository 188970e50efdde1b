// libFuzzer target for the manifest parser: any input must either parse or throw tensorstream::Error; anything
// else (a crash, a sanitizer report, another exception type, a hang) is a bug.
//
// Each input is parsed twice: as the whole file it is, which exercises the header rules, and with a freshly
// computed header in front of its JSON part, so that mutations of the JSON get past manifest.checksum and reach
// the JSON, schema and layout rules. The seeds (seeds/valid.manifest; seeds/small_chunks.manifest, whose first
// tensor has its own chunk_size) use the expectations below.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include "tensorstream/error.hpp"
#include "tensorstream/format/checksum.hpp"
#include "tensorstream/format/manifest.hpp"

namespace {

tensorstream::ManifestExpectations make_expectations() {
  tensorstream::ManifestExpectations expect;
  expect.path = "fuzz/models/fuzz-model/manifest";
  for (size_t i = 0; i < expect.store_id.size(); ++i) expect.store_id[i] = static_cast<uint8_t>(0x10 + i);
  expect.model_id = "fuzz-model";
  expect.data_file_size = std::nullopt;
  return expect;
}

void put_le64(std::byte* out, uint64_t value) {
  for (int i = 0; i < 8; ++i) out[i] = static_cast<std::byte>(value >> (8 * i));
}

void parse(std::span<const std::byte> file, const tensorstream::ManifestExpectations& expect) {
  try {
    const tensorstream::Manifest manifest = tensorstream::parse_manifest(file, expect);
    // A manifest that parses must survive a round trip unchanged.
    const std::vector<std::byte> again = tensorstream::serialize_manifest(manifest);
    const tensorstream::Manifest reparsed = tensorstream::parse_manifest(again, expect);
    if (reparsed.tensors.size() != manifest.tensors.size() || reparsed.chunks.size() != manifest.chunks.size() ||
        reparsed.data_size != manifest.data_size || tensorstream::serialize_manifest(reparsed) != again) {
      __builtin_trap();
    }
  } catch (const tensorstream::Error&) {
    // Refusing the input is the expected outcome for almost every mutation.
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const tensorstream::ManifestExpectations expect = make_expectations();
  const auto input = std::as_bytes(std::span(data, size));
  parse(input, expect);

  if (size >= tensorstream::kManifestHeaderSize) {
    std::vector<std::byte> fixed(input.begin(), input.end());
    std::memcpy(fixed.data(), "TSMANIF", 8);  // the magic, with its terminating zero byte
    put_le64(fixed.data() + 8, tensorstream::kFormatVersion);  // version 1 and flags 0
    const auto json = std::span<const std::byte>(fixed).subspan(tensorstream::kManifestHeaderSize);
    put_le64(fixed.data() + 16, json.size());
    put_le64(fixed.data() + 24, tensorstream::plain_checksum(json));
    parse(fixed, expect);
  }
  return 0;
}
