package dest

import (
	"testing"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/flow"
	"github.com/vfio-ferry/ferry/services/wire"
)

// TestFeedbackEvery checks how far a frontier moves between window
// updates: a quarter window for a source without prompt feedback, at
// most 4 MiB (and the chunks in it) for one with it, which keeps less
// than the window in flight and would otherwise wait a quarter window.
func TestFeedbackEvery(t *testing.T) {
	const mib = 1 << 20
	prompt := wire.Features(0).With(ferryv1.Feature_FEATURE_PROMPT_FEEDBACK)
	tests := []struct {
		name                  string
		limits                flow.Limits
		chunk                 uint32
		features              wire.Features
		wantChunks, wantBytes uint64
	}{
		{"a quarter window without the feature", flow.Limits{MaxChunks: 64, MaxBytes: 64 * mib}, mib, 0, 16, 16 * mib},
		{"4 MiB with it", flow.Limits{MaxChunks: 64, MaxBytes: 64 * mib}, mib, prompt, 4, 4 * mib},
		{"small chunks: the chunks of 4 MiB", flow.Limits{MaxChunks: 1024, MaxBytes: 64 * mib}, 64 << 10, prompt, 64, 4 * mib},
		{"a window below 16 MiB: still a quarter", flow.Limits{MaxChunks: 8, MaxBytes: 8 * mib}, mib, prompt, 2, 2 * mib},
		{"16 MiB chunks: every chunk", flow.Limits{MaxChunks: 16, MaxBytes: 256 * mib}, 16 * mib, prompt, 1, 4 * mib},
		{"a one-chunk window: every chunk", flow.Limits{MaxChunks: 1, MaxBytes: mib}, mib, prompt, 1, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			chunks, bytes := feedbackEvery(tt.limits, tt.chunk, tt.features)
			if chunks != tt.wantChunks || bytes != tt.wantBytes {
				t.Errorf("feedbackEvery = %d chunks, %d bytes; want %d, %d", chunks, bytes, tt.wantChunks, tt.wantBytes)
			}
		})
	}
}
