package wire

import (
	"slices"
	"testing"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
)

func TestFeatures(t *testing.T) {
	got := FeaturesOf([]ferryv1.Feature{ferryv1.Feature_FEATURE_PRECOPY, 63, ferryv1.Feature_FEATURE_COMMIT, -1, 1000})
	if !got.Has(ferryv1.Feature_FEATURE_COMMIT) || !got.Has(ferryv1.Feature_FEATURE_PRECOPY) || got.Has(ferryv1.Feature_FEATURE_CONFIG_STATE) {
		t.Fatalf("FeaturesOf: %v", got)
	}
	if got.Has(63) {
		t.Fatal("a feature this build does not know was granted")
	}
	if want := []ferryv1.Feature{ferryv1.Feature_FEATURE_COMMIT, ferryv1.Feature_FEATURE_PRECOPY}; !slices.Equal(got.List(), want) {
		t.Fatalf("List: %v", got.List())
	}
	if got.String() != "COMMIT,PRECOPY" || Features(0).String() != "none (0.1.0)" {
		t.Fatalf("String: %q %q", got.String(), Features(0).String())
	}
	for f := range ferryv1.Feature_name {
		if f != 0 && !Supported.Has(ferryv1.Feature(f)) {
			t.Errorf("feature %v is in the proto but not Supported", ferryv1.Feature(f))
		}
	}
}
