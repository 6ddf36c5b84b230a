package bench

import (
	"context"
	"strings"
	"testing"
)

func TestConfigValidate(t *testing.T) {
	ok := Config{Size: 8 << 20, Devices: 1, ChunkSize: 1 << 20, Window: 64 << 20, Channels: []int{1, 4}, Rounds: 1,
		Exe: "ferry", Migrate: func(context.Context, Migration) (Outcome, error) { return Outcome{}, nil }}
	for _, tc := range []struct {
		name   string
		change func(*Config)
		want   string // "" accepts
	}{
		{"defaults", func(*Config) {}, ""},
		{"no channels", func(c *Config) { c.Channels = nil }, "--channels"},
		{"too many channels", func(c *Config) { c.Channels = []int{1, 65} }, "--channels"},
		{"empty devices", func(c *Config) { c.Size = 0 }, "--size"},
		{"no devices", func(c *Config) { c.Devices = 0 }, "--devices"},
		{"tiny chunks", func(c *Config) { c.ChunkSize = 512 }, "--chunk-size"},
		{"no rounds", func(c *Config) { c.Rounds = 0 }, "--rounds"},
		{"window below a chunk", func(c *Config) { c.Window = 1 << 19 }, "--window"},
		{"only what", func(c *Config) { c.Only = "udp" }, "--only"},
		{"bad rate", func(c *Config) { c.Rate = "fast" }, "--rate"},
		{"a rate", func(c *Config) { c.Rate = "256MB/s" }, ""},
		{"a link", func(c *Config) { c.Link = 500_000_000 }, ""},
		{"a link too slow", func(c *Config) { c.Link = 1000 }, "--link"},
		{"a limited arm", func(c *Config) { c.MaxBandwidth = 125_000_000 }, ""},
		{"a limit too low", func(c *Config) { c.MaxBandwidth = 1000 }, "--max-bandwidth"},
		{"a limited arm with one arm only", func(c *Config) { c.MaxBandwidth, c.Only = 125_000_000, "ferry" }, "--max-bandwidth"},
		{"no control plane", func(c *Config) { c.Migrate = nil }, "control plane"},
	} {
		c := ok
		tc.change(&c)
		err := c.Validate()
		if (tc.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.want)
		}
	}
}

func TestMedianOf(t *testing.T) {
	for _, tc := range []struct {
		v      []float64
		median float64
		rng    [2]float64
	}{
		{[]float64{3}, 3, [2]float64{3, 3}},
		{[]float64{5, 1, 3}, 3, [2]float64{1, 5}},
		{[]float64{4, 1, 3, 2}, 2.5, [2]float64{1, 4}},
	} {
		if m, r := medianOf(tc.v); m != tc.median || r != tc.rng {
			t.Errorf("medianOf(%v) = %v %v, want %v %v", tc.v, m, r, tc.median, tc.rng)
		}
	}
}
