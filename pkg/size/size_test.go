package size

import (
	"errors"
	"testing"
)

func TestParse(t *testing.T) {
	cases := []struct {
		in   string
		want uint64
		err  bool
	}{
		{"0", 0, false},
		{"4096", 4096, false},
		{"1B", 1, false},
		{"1KiB", 1024, false},
		{"256MiB", 256 << 20, false},
		{"1GiB", 1 << 30, false},
		{"1gib", 1 << 30, false},
		{"1G", 1 << 30, false},
		{"2GB", 2e9, false},
		{"1.5MiB", 1536 << 10, false},
		{" 8 MiB ", 8 << 20, false},
		{"", 0, true},
		{"MiB", 0, true},
		{"-1", 0, true},
		{"1.3B", 0, true},
		{"1e400", 0, true},
		{"NaN", 0, true},
		{"9EiB", 0, true},
		{"18446744073709551615", 0, true},
		{"1XB", 0, true},
	}
	for _, c := range cases {
		got, err := Parse(c.in)
		if c.err {
			if !errors.Is(err, ErrSyntax) {
				t.Errorf("Parse(%q) = %d, %v; want ErrSyntax", c.in, got, err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("Parse(%q) = %d, %v; want %d", c.in, got, err, c.want)
		}
	}
}

func TestParseRate(t *testing.T) {
	for in, want := range map[string]uint64{"2GB/s": 2e9, "256MiB/s": 256 << 20, "100MB": 1e8,
		"2Gbit/s": 250e6, "4gbit": 500e6, "100Mbit/s": 12.5e6, "1.5Gbit/s": 187.5e6, "800kbit": 1e5, "64bit": 8} {
		got, err := ParseRate(in)
		if err != nil || got != want {
			t.Errorf("ParseRate(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"fast", "Gbit/s", "-1Gbit", "1bit", "1e30Tbit", "NaNGbit"} {
		if _, err := ParseRate(bad); !errors.Is(err, ErrSyntax) {
			t.Errorf("ParseRate(%q) error = %v, want ErrSyntax", bad, err)
		}
	}
}

func TestFormatRoundTrip(t *testing.T) {
	for n, want := range map[uint64]string{0: "0B", 1000: "1000B", 1 << 30: "1GiB", 1536 << 10: "1.5MiB", 8 << 20: "8MiB"} {
		if got := Format(n); got != want {
			t.Errorf("Format(%d) = %q, want %q", n, got, want)
		}
		back, err := Parse(want)
		if err != nil || back != n {
			t.Errorf("Parse(Format(%d)) = %d, %v", n, back, err)
		}
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"1GiB", "256MiB", "1.5GB", "0", "-3", "1e9", "9EiB", "  7 k "} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := Parse(s)
		if err != nil {
			if !errors.Is(err, ErrSyntax) {
				t.Fatalf("Parse(%q) error %v does not wrap ErrSyntax", s, err)
			}
			return
		}
		if n > 1<<63-1 {
			t.Fatalf("Parse(%q) = %d above int64", s, n)
		}
	})
}
