// Test support: whether this build runs under ThreadSanitizer. Tests that race on purpose (to show that a rule,
// broken, is caught) skip that half under it: TSan rightly reports the race they create.
#pragma once

namespace tensorstream::testing {

#if defined(__SANITIZE_THREAD__)
inline constexpr bool kUnderTsan = true;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
inline constexpr bool kUnderTsan = true;
#else
inline constexpr bool kUnderTsan = false;
#endif
#else
inline constexpr bool kUnderTsan = false;
#endif

}  // namespace tensorstream::testing
