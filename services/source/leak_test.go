package source

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests when a goroutine outlives them:
// every goroutine of the agent is owned and ends with it.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
