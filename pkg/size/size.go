// Package size parses and prints byte sizes and byte rates the way Ferry's
// flags, device specs and reports write them: "1GiB", "256MiB", "4096",
// "1.5GB", and rates such as "2GB/s", "256MiB/s" or "2Gbit/s".
//
// Binary suffixes (KiB, MiB, GiB, TiB) are powers of 1024; decimal ones
// (kB or KB, MB, GB, TB) are powers of 1000; "B" or no suffix means bytes.
// Suffixes are case-insensitive. Negative sizes, sizes above 2^63-1 and
// fractions of a byte are errors.
package size

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// ErrSyntax is returned (wrapped) for any string that is not a size.
var ErrSyntax = errors.New("invalid size")

var suffixes = []struct {
	name string
	mult uint64
}{
	// Longest first so "MiB" is not read as "B".
	{"kib", 1 << 10}, {"mib", 1 << 20}, {"gib", 1 << 30}, {"tib", 1 << 40},
	{"kb", 1e3}, {"mb", 1e6}, {"gb", 1e9}, {"tb", 1e12},
	{"k", 1 << 10}, {"m", 1 << 20}, {"g", 1 << 30}, {"t", 1 << 40},
	{"b", 1},
}

// Parse reads a byte size.
func Parse(s string) (uint64, error) {
	t := strings.TrimSpace(s)
	if t == "" || len(t) > 64 {
		return 0, fmt.Errorf("%w %q", ErrSyntax, s)
	}
	lower := strings.ToLower(t)
	mult := uint64(1)
	num := lower
	for _, suf := range suffixes {
		if strings.HasSuffix(lower, suf.name) {
			mult = suf.mult
			num = strings.TrimSpace(lower[:len(lower)-len(suf.name)])
			break
		}
	}
	if num == "" {
		return 0, fmt.Errorf("%w %q", ErrSyntax, s)
	}
	if n, err := strconv.ParseUint(num, 10, 64); err == nil {
		if n > math.MaxInt64/mult {
			return 0, fmt.Errorf("%w %q: too large", ErrSyntax, s)
		}
		return n * mult, nil
	}
	f, err := strconv.ParseFloat(num, 64)
	if err != nil || f < 0 || math.IsNaN(f) || math.IsInf(f, 0) {
		return 0, fmt.Errorf("%w %q", ErrSyntax, s)
	}
	v := f * float64(mult)
	if v >= math.MaxInt64 {
		return 0, fmt.Errorf("%w %q: too large", ErrSyntax, s)
	}
	if v != math.Trunc(v) {
		return 0, fmt.Errorf("%w %q: not a whole number of bytes", ErrSyntax, s)
	}
	return uint64(v), nil
}

// bitSuffixes are the bit-rate units, decimal as network rates are.
var bitSuffixes = []struct {
	name string
	mult uint64
}{
	{"kbit", 1e3}, {"mbit", 1e6}, {"gbit", 1e9}, {"tbit", 1e12}, {"bit", 1},
}

// ParseRate reads a byte rate such as "2GB/s", or a bit rate such as
// "2Gbit/s" or "100Mbit" (decimal, 8 bits a byte, as links are rated); the
// "/s" is optional. A bit rate must be a whole number of bytes.
func ParseRate(s string) (uint64, error) {
	t := strings.TrimSpace(s)
	t = strings.TrimSuffix(strings.TrimSuffix(t, "/s"), "/S")
	lower := strings.ToLower(t)
	for _, suf := range bitSuffixes {
		if !strings.HasSuffix(lower, suf.name) {
			continue
		}
		num := strings.TrimSpace(lower[:len(lower)-len(suf.name)])
		f, err := strconv.ParseFloat(num, 64)
		if num == "" || len(num) > 32 || err != nil || f < 0 || math.IsNaN(f) || math.IsInf(f, 0) {
			return 0, fmt.Errorf("rate: %w %q", ErrSyntax, s)
		}
		v := f * float64(suf.mult) / 8
		if v >= math.MaxInt64 {
			return 0, fmt.Errorf("rate: %w %q: too large", ErrSyntax, s)
		}
		if v != math.Trunc(v) {
			return 0, fmt.Errorf("rate: %w %q: not a whole number of bytes per second", ErrSyntax, s)
		}
		return uint64(v), nil
	}
	n, err := Parse(t)
	if err != nil {
		return 0, fmt.Errorf("rate: %w", err)
	}
	return n, nil
}

// Format prints n with the largest binary suffix that keeps it readable:
// 1073741824 is "1GiB", 1572864 is "1.5MiB", 1000 is "1000B".
func Format(n uint64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	i := 0
	v := float64(n)
	for v >= 1024 && i < len(units)-1 {
		v /= 1024
		i++
	}
	if i == 0 {
		return strconv.FormatUint(n, 10) + "B"
	}
	s := strconv.FormatFloat(v, 'f', 2, 64)
	s = strings.TrimRight(strings.TrimRight(s, "0"), ".")
	return s + units[i]
}

// FormatRate prints a rate in decimal units per second, as network and
// disk rates are usually read: "2.37 GB/s".
func FormatRate(bytesPerSecond float64) string {
	units := []string{"B/s", "kB/s", "MB/s", "GB/s", "TB/s"}
	i := 0
	for bytesPerSecond >= 1000 && i < len(units)-1 {
		bytesPerSecond /= 1000
		i++
	}
	return strconv.FormatFloat(bytesPerSecond, 'f', 2, 64) + " " + units[i]
}
