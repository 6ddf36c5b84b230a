package flow

import (
	"errors"
	"math"
	"testing"
)

func TestLimitsValidate(t *testing.T) {
	for _, tt := range []struct {
		name      string
		limits    Limits
		chunkSize uint32
		ok        bool
	}{
		{"typical", Limits{MaxChunks: 1024, MaxBytes: 64 << 20}, 64 << 10, true},
		{"one-chunk-exactly", Limits{MaxChunks: 1, MaxBytes: 4096}, 4096, true},
		{"max-window-chunks", Limits{MaxChunks: MaxWindowChunks, MaxBytes: 1}, 1, true},
		{"huge-max-bytes", Limits{MaxChunks: 1, MaxBytes: math.MaxUint64}, math.MaxUint32, true},
		{"zero-chunks", Limits{MaxChunks: 0, MaxBytes: 1 << 20}, 4096, false},
		{"bytes-below-chunk", Limits{MaxChunks: 16, MaxBytes: 4095}, 4096, false},
		{"zero-bytes", Limits{MaxChunks: 16, MaxBytes: 0}, 1, false},
		{"zero-chunk-size", Limits{MaxChunks: 16, MaxBytes: 4096}, 0, false},
		{"too-many-chunks", Limits{MaxChunks: MaxWindowChunks + 1, MaxBytes: 1 << 30}, 1, false},
		{"zero-value", Limits{}, 1, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.limits.Validate(tt.chunkSize)
			if tt.ok && err != nil {
				t.Fatalf("Validate(%d) = %v, want nil", tt.chunkSize, err)
			}
			if !tt.ok && !errors.Is(err, ErrBadLimits) {
				t.Fatalf("Validate(%d) = %v, want ErrBadLimits", tt.chunkSize, err)
			}
		})
	}
}

func TestWindowAdmits(t *testing.T) {
	const top = math.MaxUint64
	for _, tt := range []struct {
		name                string
		w                   Window
		seq, offset, length uint64
		want                bool
	}{
		{"zero-window", Window{}, 0, 0, 0, false},
		{"first-chunk", Window{1, 100}, 0, 0, 100, true},
		{"seq-at-limit", Window{1, 100}, 1, 0, 1, false},
		{"bytes-exactly-at-limit", Window{4, 100}, 3, 90, 10, true},
		{"one-byte-over", Window{4, 100}, 3, 90, 11, false},
		{"end-at-limit-offset", Window{4, 100}, 3, 100, 0, true},
		{"offset-past-limit", Window{4, 100}, 3, 101, 0, false},
		{"length-would-wrap", Window{4, 100}, 3, 90, top - 50, false},
		{"offset-and-length-wrap", Window{4, top}, 3, top - 5, 10, false},
		{"saturated-window", Window{top, top}, top - 1, top - 10, 10, true},
		{"max-seq-never-admitted", Window{top, top}, top, 0, 0, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.w.Admits(tt.seq, tt.offset, tt.length); got != tt.want {
				t.Fatalf("%v Admits(%d, %d, %d) = %t, want %t", tt.w, tt.seq, tt.offset, tt.length, got, tt.want)
			}
		})
	}
}

func TestSatAdd(t *testing.T) {
	if got := satAdd(1, 2); got != 3 {
		t.Errorf("satAdd(1, 2) = %d", got)
	}
	if got := satAdd(math.MaxUint64-1, 1); got != math.MaxUint64 {
		t.Errorf("satAdd(max-1, 1) = %d", got)
	}
	if got := satAdd(math.MaxUint64-1, 5); got != math.MaxUint64 {
		t.Errorf("satAdd(max-1, 5) = %d, want saturation", got)
	}
}
