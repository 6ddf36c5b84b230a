package shapedlink

import (
	"errors"
	"testing"
)

// ForTest makes a link for tb shaped to rate bytes per second (0:
// unshaped) and removes it when the test ends, passed or failed. It skips
// the test, saying why, where a link cannot be made (not root, no ip or
// tc, no tbf) and fails it on any other error.
func ForTest(tb testing.TB, rate uint64) *Link {
	tb.Helper()
	l, err := New(tb.Context(), rate)
	if errors.Is(err, ErrUnsupported) {
		tb.Skipf("no shaped link: %v", err)
	}
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := l.Close(); err != nil {
			tb.Errorf("removing the shaped link: %v", err)
		}
	})
	return l
}
