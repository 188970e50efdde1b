#include "tensorstream/format/checksum.hpp"

#include <xxhash.h>

#include <algorithm>
#include <cstring>
#include <new>
#include <utility>
#include <vector>

namespace tensorstream {

namespace {
void put_le64(uint8_t* out, uint64_t value) noexcept {
  for (int i = 0; i < 8; ++i) out[i] = static_cast<uint8_t>(value >> (8 * i));
}

int hex_digit(char c) noexcept {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;  // uppercase is rejected on purpose: one spelling per value
}
}  // namespace

uint64_t chunk_seed(const ChunkBinding& binding) noexcept {
  uint8_t record[40];
  std::memcpy(record, binding.store_id.data(), 16);
  put_le64(record + 16, binding.tensor_index);
  put_le64(record + 24, binding.chunk_index);
  put_le64(record + 32, binding.file_offset);
  return XXH3_64bits(record, sizeof(record));
}

uint64_t chunk_checksum(const ChunkBinding& binding, std::span<const std::byte> stored) noexcept {
  return XXH3_64bits_withSeed(stored.data(), stored.size(), chunk_seed(binding));
}

uint64_t plain_checksum(std::span<const std::byte> bytes) noexcept {
  return XXH3_64bits(bytes.data(), bytes.size());
}

std::string hex64(uint64_t value) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string text(16, '0');
  for (int i = 15; i >= 0; --i) {
    text[static_cast<size_t>(i)] = kDigits[value & 0xf];
    value >>= 4;
  }
  return text;
}

bool parse_hex64(std::string_view text, uint64_t& value) noexcept {
  if (text.size() != 16) return false;
  uint64_t result = 0;
  for (char c : text) {
    const int digit = hex_digit(c);
    if (digit < 0) return false;
    result = (result << 4) | static_cast<uint64_t>(digit);
  }
  value = result;
  return true;
}

std::string hex_bytes(std::span<const uint8_t> bytes) {
  std::string text;
  text.reserve(bytes.size() * 2);
  for (uint8_t b : bytes) {
    const std::string pair = hex64(b);
    text += pair.substr(14);
  }
  return text;
}

bool parse_hex_bytes(std::string_view text, std::span<uint8_t> out) noexcept {
  if (text.size() != out.size() * 2) return false;
  for (size_t i = 0; i < out.size(); ++i) {
    const int high = hex_digit(text[2 * i]);
    const int low = hex_digit(text[2 * i + 1]);
    if (high < 0 || low < 0) return false;
    out[i] = static_cast<uint8_t>(high * 16 + low);
  }
  return true;
}

// Each block is hashed on its own; finish() combines the block digests sorted by block name. The fingerprint is
// therefore independent of the order of blocks in the data file, so defragmentation (which reorders blocks)
// keeps a model's identity.
struct FingerprintBuilder::State {
  std::vector<std::pair<std::string, XXH128_hash_t>> finished_blocks;
  std::string current_name;
  XXH3_state_t* current = nullptr;
  bool has_current = false;

  State() : current(XXH3_createState()) {
    if (current == nullptr) throw std::bad_alloc();
  }
  ~State() { XXH3_freeState(current); }
  State(const State&) = delete;
  State& operator=(const State&) = delete;

  void close_current() {
    if (has_current) finished_blocks.emplace_back(std::move(current_name), XXH3_128bits_digest(current));
    has_current = false;
  }
};

namespace {
void update_field(XXH3_state_t* state, char tag, std::span<const std::byte> bytes) {
  uint8_t length[8];
  put_le64(length, bytes.size());
  XXH3_128bits_update(state, &tag, 1);
  XXH3_128bits_update(state, length, sizeof(length));
  XXH3_128bits_update(state, bytes.data(), bytes.size());
}

std::span<const std::byte> text_bytes(std::string_view text) {
  return std::as_bytes(std::span(text.data(), text.size()));
}
}  // namespace

FingerprintBuilder::FingerprintBuilder() : state_(std::make_unique<State>()) {}
FingerprintBuilder::~FingerprintBuilder() = default;
FingerprintBuilder::FingerprintBuilder(FingerprintBuilder&&) noexcept = default;
FingerprintBuilder& FingerprintBuilder::operator=(FingerprintBuilder&&) noexcept = default;

void FingerprintBuilder::add_block(std::string_view block_name) {
  state_->close_current();
  state_->current_name = std::string(block_name);
  XXH3_128bits_reset(state_->current);
  state_->has_current = true;
}

void FingerprintBuilder::add_tensor(std::string_view tensor_name, std::string_view dtype_name,
                                    std::span<const int64_t> shape) {
  if (!state_->has_current) add_block("");
  update_field(state_->current, 'T', text_bytes(tensor_name));
  update_field(state_->current, 'D', text_bytes(dtype_name));
  std::vector<uint8_t> dims((shape.size() + 1) * 8);
  put_le64(dims.data(), shape.size());
  for (size_t i = 0; i < shape.size(); ++i) put_le64(dims.data() + 8 * (i + 1), static_cast<uint64_t>(shape[i]));
  update_field(state_->current, 'S', std::as_bytes(std::span(dims)));
}

void FingerprintBuilder::add_bytes(std::span<const std::byte> raw) {
  // No length prefix: dtype and shape, hashed just before, fix the byte count. This lets callers stream a
  // tensor in chunks.
  if (!state_->has_current) add_block("");
  XXH3_128bits_update(state_->current, raw.data(), raw.size());
}

std::string FingerprintBuilder::finish() const {
  std::vector<std::pair<std::string_view, XXH128_hash_t>> blocks;
  for (const auto& [name, digest] : state_->finished_blocks) blocks.emplace_back(name, digest);
  if (state_->has_current) blocks.emplace_back(state_->current_name, XXH3_128bits_digest(state_->current));
  std::sort(blocks.begin(), blocks.end(), [](const auto& a, const auto& b) { return a.first < b.first; });

  XXH3_state_t* combined = XXH3_createState();
  if (combined == nullptr) throw std::bad_alloc();
  XXH3_128bits_reset(combined);
  for (const auto& [name, digest] : blocks) {
    update_field(combined, 'B', text_bytes(name));
    uint8_t bytes[16];
    put_le64(bytes, digest.high64);
    put_le64(bytes + 8, digest.low64);
    XXH3_128bits_update(combined, bytes, sizeof(bytes));
  }
  const XXH128_hash_t hash = XXH3_128bits_digest(combined);
  XXH3_freeState(combined);
  return hex64(hash.high64) + hex64(hash.low64);
}

}  // namespace tensorstream
