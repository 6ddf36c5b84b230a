package wire

import (
	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
)

// Features is a set of the protocol's features (ferryv1.Feature): what a
// source asks for in Open, what a destination grants, what a session
// uses. The zero set is Ferry 0.1.0's protocol.
type Features uint64

// Supported is every feature this build speaks.
const Supported = Features(1<<ferryv1.Feature_FEATURE_COMMIT | 1<<ferryv1.Feature_FEATURE_PRECOPY |
	1<<ferryv1.Feature_FEATURE_CONFIG_STATE | 1<<ferryv1.Feature_FEATURE_DEVICE_CHECK |
	1<<ferryv1.Feature_FEATURE_ZERO_CHUNKS | 1<<ferryv1.Feature_FEATURE_COMPRESSION_ZSTD |
	1<<ferryv1.Feature_FEATURE_PROMPT_FEEDBACK)

// Has reports whether f is in the set.
func (s Features) Has(f ferryv1.Feature) bool { return f > 0 && f < 64 && s&(1<<f) != 0 }

// With is the set with f added.
func (s Features) With(f ferryv1.Feature) Features {
	if f <= 0 || f >= 64 {
		return s
	}
	return s | 1<<f
}

// FeaturesOf reads a list from the wire; values this build does not
// know are left out (a newer peer's features are not granted).
func FeaturesOf(list []ferryv1.Feature) Features {
	var s Features
	for _, f := range list {
		s = s.With(f)
	}
	return s & Supported
}

// List is the set for the wire, in the enum's order.
func (s Features) List() []ferryv1.Feature {
	var out []ferryv1.Feature
	for f := ferryv1.Feature(1); f < 64; f++ {
		if s.Has(f) {
			out = append(out, f)
		}
	}
	return out
}

// Names are the features' names for messages and logs: "COMMIT,PRECOPY".
func (s Features) String() string {
	out := ""
	for _, f := range s.List() {
		if out != "" {
			out += ","
		}
		out += featureName(f)
	}
	if out == "" {
		return "none (0.1.0)"
	}
	return out
}

func featureName(f ferryv1.Feature) string {
	n := f.String()
	const prefix = "FEATURE_"
	if len(n) > len(prefix) && n[:len(prefix)] == prefix {
		return n[len(prefix):]
	}
	return n
}
