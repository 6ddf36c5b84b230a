//go:build linux

package vfio

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// fakeHost builds a sysfs and /dev tree in a temporary directory. Device
// nodes are symbolic links to /dev/null, which os.Stat sees as character
// devices, so no privilege is needed.
type fakeHost struct {
	t *testing.T
	hostPaths
}

func newFakeHost(t *testing.T) *fakeHost {
	root := t.TempDir()
	return &fakeHost{t: t, hostPaths: hostPaths{sys: filepath.Join(root, "sys"), dev: filepath.Join(root, "dev")}}
}

func (h *fakeHost) mkdir(path string) {
	h.t.Helper()
	if err := os.MkdirAll(path, 0o755); err != nil {
		h.t.Fatal(err)
	}
}

func (h *fakeHost) symlink(target, link string) {
	h.t.Helper()
	h.mkdir(filepath.Dir(link))
	if err := os.Symlink(target, link); err != nil {
		h.t.Fatal(err)
	}
}

// device adds a device to a bus: its IOMMU group, its driver, and a
// vfio-dev child when vfioDev is not "".
func (h *fakeHost) device(bus, name, group, driver, vfioDev string) {
	dir := filepath.Join(h.sys, "bus", bus, "devices", name)
	h.mkdir(dir)
	if group != "" {
		h.symlink("../../../kernel/iommu_groups/"+group, filepath.Join(dir, "iommu_group"))
	}
	if driver != "" {
		h.symlink("../../../bus/"+bus+"/drivers/"+driver, filepath.Join(dir, "driver"))
	}
	if vfioDev != "" {
		h.mkdir(filepath.Join(dir, "vfio-dev", vfioDev))
	}
}

// node adds a character device under /dev.
func (h *fakeHost) node(rel string) {
	h.symlink("/dev/null", filepath.Join(h.dev, rel))
}

func mustSpec(t *testing.T, s string) Spec {
	t.Helper()
	spec, err := ParseSpec(s)
	if err != nil {
		t.Fatal(err)
	}
	return spec
}

func TestResolveSpec(t *testing.T) {
	h := newFakeHost(t)
	h.device("pci", "0000:3b:00.2", "12", "vfio-pci", "vfio0")
	h.node("vfio/12")
	h.device("pci", "0000:3b:00.3", "13", "mlx5_vfio_pci", "") // pre-6.1: no vfio-dev
	h.node("vfio/13")
	h.device("pci", "0000:00:1f.6", "7", "e1000e", "") // not VFIO
	h.node("vfio/7")                                   // (another device of its group is)
	h.device("pci", "0000:3b:00.4", "14", "vfio-pci", "vfio2")
	h.node("vfio/noiommu-14")
	h.device("pci", "0000:3b:00.5", "15", "vfio-pci", "vfio3")
	h.node("vfio/15")
	h.node("vfio/devices/vfio3")
	h.device("pci", "0000:3b:00.6", "16", "vfio-pci", "vfio4") // group node missing
	h.device("pci", "0000:3b:00.7", "", "vfio-pci", "vfio5")   // cdev only, no group
	h.node("vfio/devices/vfio5")
	const uuid = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
	h.device("mdev", uuid, "20", "ferry_mig", "vfio6")
	h.node("vfio/20")

	for _, tc := range []struct {
		spec    string
		want    resolved
		wantErr error
	}{
		{spec: "pci:0000:3b:00.2", want: resolved{name: "0000:3b:00.2", groupNode: "vfio/12"}},
		{spec: "pci:0000:3B:00.2", want: resolved{name: "0000:3b:00.2", groupNode: "vfio/12"}},
		{spec: "pci:0000:3b:00.3", want: resolved{name: "0000:3b:00.3", groupNode: "vfio/13"}},
		{spec: "pci:0000:00:1f.6", wantErr: ErrNotSupported},
		{spec: "pci:0000:3b:00.4", want: resolved{name: "0000:3b:00.4", groupNode: "vfio/noiommu-14", noIOMMU: true}},
		{spec: "pci:0000:3b:00.5", want: resolved{name: "0000:3b:00.5", groupNode: "vfio/15", cdevNode: "vfio/devices/vfio3"}},
		{spec: "pci:0000:3b:00.6", wantErr: ErrNotSupported},
		{spec: "pci:0000:3b:00.7", want: resolved{name: "0000:3b:00.7", cdevNode: "vfio/devices/vfio5"}},
		{spec: "pci:0000:99:00.0", wantErr: fs.ErrNotExist},
		{spec: "mdev:" + uuid, want: resolved{name: uuid, groupNode: "vfio/20"}},
		{spec: "mdev:00000000-0000-0000-0000-000000000000", wantErr: fs.ErrNotExist},
		{spec: "sim:size=1MiB", wantErr: ErrNotSupported},
	} {
		t.Run(tc.spec, func(t *testing.T) {
			got, err := resolveSpec(h.hostPaths, mustSpec(t, tc.spec))
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("resolveSpec: %v, want an error wrapping %v", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("resolveSpec: %v", err)
			}
			want := tc.want
			if want.groupNode != "" {
				want.groupNode = filepath.Join(h.dev, want.groupNode)
			}
			if want.cdevNode != "" {
				want.cdevNode = filepath.Join(h.dev, want.cdevNode)
			}
			got.sysDir = "" // checked by the lookups succeeding
			if got != want {
				t.Errorf("resolveSpec = %+v, want %+v", got, want)
			}
		})
	}
}

// TestResolveSpecRejectsPaths checks that a Spec built by hand, not by
// ParseSpec, cannot lead the backend out of sysfs.
func TestResolveSpecRejectsPaths(t *testing.T) {
	h := newFakeHost(t)
	for _, uuid := range []string{"../../../../etc", "83B8F4F2-509F-382F-3C1E-E6BFE0FA1001", ""} {
		_, err := resolveSpec(h.hostPaths, Spec{Kind: SpecMdev, MdevUUID: uuid})
		if !errors.Is(err, ErrBadSpec) {
			t.Errorf("mdev %q: %v, want ErrBadSpec", uuid, err)
		}
	}
}

func TestListKernelDevices(t *testing.T) {
	h := newFakeHost(t)
	h.device("pci", "0000:3b:00.2", "12", "vfio-pci", "vfio0")
	h.node("vfio/12")
	h.device("pci", "0000:00:1f.6", "7", "e1000e", "")
	h.device("pci", "0000:00:02.0", "1", "vfio-pci", "vfio1")
	h.node("vfio/1")
	h.device("pci", "0000:3b:00.6", "16", "vfio-pci", "vfio4") // no group node
	h.device("mdev", "83b8f4f2-509f-382f-3c1e-e6bfe0fa1002", "21", "ferry_mig", "vfio8")
	h.node("vfio/21")
	h.device("mdev", "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001", "20", "ferry_mig", "vfio7")
	h.node("vfio/20")
	h.mkdir(filepath.Join(h.sys, "bus/mdev/devices/not-a-uuid"))

	got, err := listKernelDevices(h.hostPaths)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range got {
		names = append(names, s.String())
	}
	want := []string{
		"pci:0000:00:02.0",
		"pci:0000:3b:00.2",
		"mdev:83b8f4f2-509f-382f-3c1e-e6bfe0fa1001",
		"mdev:83b8f4f2-509f-382f-3c1e-e6bfe0fa1002",
	}
	if !slices.Equal(names, want) {
		t.Errorf("listKernelDevices = %q, want %q", names, want)
	}
}

func TestListKernelDevicesNoVFIO(t *testing.T) {
	h := newFakeHost(t)
	got, err := listKernelDevices(h.hostPaths)
	if err != nil || len(got) != 0 {
		t.Errorf("listKernelDevices on an empty host = %v, %v; want none", got, err)
	}
}
