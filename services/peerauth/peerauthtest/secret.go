package peerauthtest

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/vfio-ferry/ferry/services/peerauth"
)

// SecretVolume is a directory laid out as the kubelet lays out a
// Kubernetes Secret volume: each key (tls.crt, tls.key, ca.crt) is a
// symlink to ..data/KEY, ..data is a symlink to a timestamped directory
// holding the files, and an update writes a new directory and swaps
// ..data to it in one rename.
type SecretVolume struct {
	Dir string
	gen int
}

// NewSecretVolume makes an empty volume in a temporary directory.
func NewSecretVolume(t testing.TB) *SecretVolume {
	t.Helper()
	v := &SecretVolume{Dir: t.TempDir()}
	for _, k := range []string{"tls.crt", "tls.key", "ca.crt"} {
		if err := os.Symlink(filepath.Join("..data", k), filepath.Join(v.Dir, k)); err != nil {
			t.Fatal(err)
		}
	}
	return v
}

// Files are the paths an agent is given: --tls-cert, --tls-key, --tls-ca.
func (v *SecretVolume) Files() peerauth.TLSFiles {
	return peerauth.TLSFiles{Cert: filepath.Join(v.Dir, "tls.crt"), Key: filepath.Join(v.Dir, "tls.key"), CA: filepath.Join(v.Dir, "ca.crt")}
}

// Project updates the volume with f's certificate and key and the CA
// bundle made of the files cas (concatenated), as the kubelet does.
func (v *SecretVolume) Project(t testing.TB, f peerauth.TLSFiles, cas ...string) {
	t.Helper()
	var bundle []byte
	for _, c := range cas {
		bundle = append(bundle, read(t, c)...)
	}
	v.ProjectBytes(t, read(t, f.Cert), read(t, f.Key), bundle)
}

// ProjectBytes updates the volume with these contents.
func (v *SecretVolume) ProjectBytes(t testing.TB, cert, key, ca []byte) {
	t.Helper()
	v.gen++
	dir := fmt.Sprintf("..2026_12_03_00_00_%02d.%d", v.gen, v.gen)
	if err := os.Mkdir(filepath.Join(v.Dir, dir), 0o755); err != nil {
		t.Fatal(err)
	}
	for k, b := range map[string][]byte{"tls.crt": cert, "tls.key": key, "ca.crt": ca} {
		if err := os.WriteFile(filepath.Join(v.Dir, dir, k), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	tmp := filepath.Join(v.Dir, "..data_tmp")
	if err := os.Symlink(dir, tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(v.Dir, "..data")); err != nil {
		t.Fatal(err)
	}
}

func read(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
