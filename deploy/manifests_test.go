package deploy

import (
	"fmt"
	"net"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"
)

// overlays are the kustomize overlays, by name.
var overlays = []string{"dev", "production", "per-node-certs"}

// The contract between the manifests and the agent (cmd/ferry/agents.go).
const (
	namespace       = "ferry-system"
	healthLiveness  = "liveness"  // the health service that stays SERVING while the agent drains
	healthReadiness = "readiness" // the health service that goes NOT_SERVING at SIGTERM
	stopTimeout     = 10 * time.Second
	// abortTimeout bounds a source's Abort of its destination after the
	// drain timeout: the smaller of its RPC timeout (30 s) and
	// --progress-timeout (default 30 s).
	abortTimeout           = 30 * time.Second
	defaultProgressTimeout = 30 * time.Second
	// runtimeHeadroom is the least memory the limit must leave above the
	// destination's memory budget.
	runtimeHeadroom = 256 << 20
)

// rendered is one overlay, rendered and decoded.
type rendered struct {
	name       string
	namespaces []corev1.Namespace
	accounts   []corev1.ServiceAccount
	configMaps []corev1.ConfigMap
	daemonSets []appsv1.DaemonSet
	namespaced map[string]string // kind/name -> namespace of every namespaced object
}

// render runs kustomize (its Go API) on deploy/overlays/<name> and decodes
// every object strictly into its Kubernetes type: an unknown field fails.
func render(t *testing.T, name string) *rendered {
	t.Helper()
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	resMap, err := k.Run(filesys.MakeFsOnDisk(), "overlays/"+name)
	if err != nil {
		t.Fatalf("kustomize build overlays/%s: %v", name, err)
	}
	r := &rendered{name: name, namespaced: make(map[string]string)}
	for _, res := range resMap.Resources() {
		doc, err := res.AsYAML()
		if err != nil {
			t.Fatal(err)
		}
		kind := res.GetKind()
		decode := func(into any) {
			t.Helper()
			if err := yaml.UnmarshalStrict(doc, into); err != nil {
				t.Fatalf("overlays/%s: %s %s does not decode strictly: %v\n%s", name, kind, res.GetName(), err, doc)
			}
		}
		switch kind {
		case "Namespace":
			var o corev1.Namespace
			decode(&o)
			r.namespaces = append(r.namespaces, o)
			continue
		case "ServiceAccount":
			var o corev1.ServiceAccount
			decode(&o)
			r.accounts = append(r.accounts, o)
		case "ConfigMap":
			var o corev1.ConfigMap
			decode(&o)
			r.configMaps = append(r.configMaps, o)
		case "DaemonSet":
			var o appsv1.DaemonSet
			decode(&o)
			r.daemonSets = append(r.daemonSets, o)
		default:
			t.Fatalf("overlays/%s renders a %s (%s): add it to the test so it is decoded strictly", name, kind, res.GetName())
		}
		r.namespaced[kind+"/"+res.GetName()] = res.GetNamespace()
	}
	return r
}

// agentDaemonSet is the overlay's one DaemonSet and its one container.
func (r *rendered) agentDaemonSet(t *testing.T) (*appsv1.DaemonSet, *corev1.Container) {
	t.Helper()
	if len(r.daemonSets) != 1 {
		t.Fatalf("overlays/%s: %d DaemonSets, want 1", r.name, len(r.daemonSets))
	}
	ds := &r.daemonSets[0]
	if n := len(ds.Spec.Template.Spec.Containers); n != 1 {
		t.Fatalf("overlays/%s: %d containers, want the one agent process", r.name, n)
	}
	return ds, &ds.Spec.Template.Spec.Containers[0]
}

// flags parses an agent's args ("agent", then --name=value or --name)
// into a map; a flag given twice fails.
func flags(t *testing.T, args []string) map[string]string {
	t.Helper()
	if len(args) == 0 || args[0] != "agent" {
		t.Fatalf("args %q: want the `agent` command first", args)
	}
	out := make(map[string]string)
	for _, a := range args[1:] {
		if !strings.HasPrefix(a, "--") {
			t.Fatalf("arg %q: want --name=value", a)
		}
		name, value, _ := strings.Cut(strings.TrimPrefix(a, "--"), "=")
		if _, dup := out[name]; dup {
			t.Fatalf("flag --%s given twice", name)
		}
		out[name] = value
	}
	return out
}

// port is the port of a host:port flag value.
func port(t *testing.T, flag, addr string) int32 {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("--%s=%s: %v", flag, addr, err)
	}
	n, err := strconv.ParseUint(p, 10, 16)
	if err != nil || n == 0 {
		t.Fatalf("--%s=%s: want a fixed port (the probes and the peers need it)", flag, addr)
	}
	return int32(n)
}

// size parses a Ferry size flag ("2GiB", "64MiB").
func size(t *testing.T, v string) int64 {
	t.Helper()
	units := []struct {
		suffix string
		mult   int64
	}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}, {"B", 1}}
	for _, u := range units {
		if n, ok := strings.CutSuffix(v, u.suffix); ok {
			i, err := strconv.ParseInt(n, 10, 64)
			if err != nil {
				t.Fatalf("size %q: %v", v, err)
			}
			return i * u.mult
		}
	}
	i, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		t.Fatalf("size %q: %v", v, err)
	}
	return i
}

var envRef = regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)

// TestOverlays checks what every overlay must get right.
func TestOverlays(t *testing.T) {
	for _, name := range overlays {
		t.Run(name, func(t *testing.T) {
			r := render(t, name)
			ds, c := r.agentDaemonSet(t)
			pod := &ds.Spec.Template.Spec
			f := flags(t, c.Args)

			t.Run("objects", func(t *testing.T) {
				if len(r.namespaces) != 1 || r.namespaces[0].Name != namespace {
					t.Errorf("want the one Namespace %s, got %d", namespace, len(r.namespaces))
				}
				for obj, ns := range r.namespaced {
					if ns != namespace {
						t.Errorf("%s is in namespace %q, want %s", obj, ns, namespace)
					}
				}
				if len(r.accounts) != 1 || r.accounts[0].Name != pod.ServiceAccountName {
					t.Errorf("the pod's ServiceAccount %q is not the one rendered", pod.ServiceAccountName)
				}
				for _, sa := range r.accounts {
					if sa.AutomountServiceAccountToken == nil || *sa.AutomountServiceAccountToken {
						t.Errorf("ServiceAccount %s mounts its token; the agent never calls the API server", sa.Name)
					}
				}
				if pod.AutomountServiceAccountToken == nil || *pod.AutomountServiceAccountToken {
					t.Error("the pod mounts a service account token")
				}
				sel := ds.Spec.Selector.MatchLabels
				if len(sel) == 0 {
					t.Fatal("empty selector")
				}
				for k, v := range sel {
					if ds.Spec.Template.Labels[k] != v {
						t.Errorf("selector %s=%s does not match the template's labels %v", k, v, ds.Spec.Template.Labels)
					}
				}
			})

			t.Run("scheduling", func(t *testing.T) {
				if !pod.HostNetwork {
					t.Error("hostNetwork is off")
				}
				if pod.DNSPolicy != corev1.DNSClusterFirstWithHostNet {
					t.Errorf("dnsPolicy %q with hostNetwork, want ClusterFirstWithHostNet", pod.DNSPolicy)
				}
				if pod.PriorityClassName != "system-node-critical" {
					t.Errorf("priorityClassName %q", pod.PriorityClassName)
				}
				if pod.NodeSelector["kubernetes.io/os"] != "linux" {
					t.Errorf("nodeSelector %v has no kubernetes.io/os: linux", pod.NodeSelector)
				}
				if len(pod.Tolerations) == 0 {
					t.Error("no tolerations")
				}
				u := ds.Spec.UpdateStrategy
				if u.Type != appsv1.RollingUpdateDaemonSetStrategyType || u.RollingUpdate == nil ||
					u.RollingUpdate.MaxUnavailable == nil || u.RollingUpdate.MaxUnavailable.IntValue() != 1 ||
					u.RollingUpdate.MaxSurge == nil || u.RollingUpdate.MaxSurge.IntValue() != 0 {
					t.Errorf("updateStrategy %+v: want RollingUpdate, one node at a time, no surge", u)
				}
			})

			t.Run("image", func(t *testing.T) {
				checkImage(t, c.Image)
				if c.ImagePullPolicy == corev1.PullAlways {
					t.Error("imagePullPolicy Always with a pinned tag")
				}
			})

			t.Run("flags and ports", func(t *testing.T) {
				if f["log-format"] != "json" {
					t.Errorf("--log-format=%q, want json", f["log-format"])
				}
				ports := map[string]int32{}
				for _, p := range c.Ports {
					if p.HostPort != p.ContainerPort {
						t.Errorf("port %s: hostPort %d != containerPort %d (hostNetwork)", p.Name, p.HostPort, p.ContainerPort)
					}
					ports[p.Name] = p.ContainerPort
				}
				for flag, portName := range map[string]string{"listen": "grpc", "health-listen": "health", "metrics-listen": "metrics", "data-listen": "data"} {
					v, ok := f[flag]
					if !ok {
						t.Errorf("--%s is not set", flag)
						continue
					}
					if got := port(t, flag, v); ports[portName] != got {
						t.Errorf("--%s opens port %d, the container's %q port is %d", flag, got, portName, ports[portName])
					}
				}
				if a := ds.Spec.Template.Annotations; a["prometheus.io/port"] != strconv.Itoa(int(ports["metrics"])) {
					t.Errorf("prometheus.io/port %q, metrics are on %d", a["prometheus.io/port"], ports["metrics"])
				}
				env := map[string]bool{}
				for _, e := range c.Env {
					env[e.Name] = true
				}
				for _, a := range c.Args {
					for _, m := range envRef.FindAllStringSubmatch(a, -1) {
						if !env[m[1]] {
							t.Errorf("arg %q refers to $(%s), which the container does not define", a, m[1])
						}
					}
				}
			})

			t.Run("probes", func(t *testing.T) {
				health := port(t, "health-listen", f["health-listen"])
				for _, p := range []struct {
					name    string
					probe   *corev1.Probe
					service string
				}{
					{"startup", c.StartupProbe, healthLiveness},
					{"liveness", c.LivenessProbe, healthLiveness},
					{"readiness", c.ReadinessProbe, healthReadiness},
				} {
					if p.probe == nil {
						t.Errorf("no %s probe", p.name)
						continue
					}
					g := p.probe.GRPC
					if g == nil || p.probe.HTTPGet != nil || p.probe.TCPSocket != nil || p.probe.Exec != nil {
						t.Errorf("%s probe: want a native gRPC probe only", p.name)
						continue
					}
					if g.Port != health {
						t.Errorf("%s probe on port %d; --health-listen opens %d", p.name, g.Port, health)
					}
					if g.Service == nil || *g.Service != p.service {
						t.Errorf("%s probe asks for service %v, want %q", p.name, g.Service, p.service)
					}
				}
			})

			t.Run("resources", func(t *testing.T) {
				req, lim := c.Resources.Requests, c.Resources.Limits
				for _, rn := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
					if q, ok := req[rn]; !ok || q.IsZero() {
						t.Errorf("no %s request", rn)
					}
				}
				mem, ok := lim[corev1.ResourceMemory]
				if !ok {
					t.Fatal("no memory limit")
				}
				if _, ok := lim[corev1.ResourceCPU]; ok {
					t.Error("a CPU limit: throttling stretches the migration downtime")
				}
				if r := req[corev1.ResourceMemory]; r.Cmp(mem) != 0 {
					t.Errorf("memory request %s != limit %s: the agent's memory is what migrations in flight hold", r.String(), mem.String())
				}
				budget := size(t, f["memory-budget"])
				if min := resource.NewQuantity(budget+runtimeHeadroom, resource.BinarySI); mem.Cmp(*min) < 0 {
					t.Errorf("memory limit %s is below --memory-budget=%s plus %d MiB for the runtime", mem.String(), f["memory-budget"], runtimeHeadroom>>20)
				}
			})

			t.Run("shutdown", func(t *testing.T) {
				drain, err := time.ParseDuration(f["drain-timeout"])
				if err != nil {
					t.Fatalf("--drain-timeout=%q: %v", f["drain-timeout"], err)
				}
				if drain < time.Minute {
					t.Errorf("--drain-timeout=%s: too short for a migration to finish", drain)
				}
				abort := abortTimeout
				if p, ok := f["progress-timeout"]; ok {
					d, err := time.ParseDuration(p)
					if err != nil {
						t.Fatalf("--progress-timeout=%q: %v", p, err)
					}
					abort = min(abort, d)
				} else {
					abort = min(abort, defaultProgressTimeout)
				}
				// SIGKILL must not cut the rollback short: the drain, the
				// Abort of what still runs, then the servers' stop.
				grace := 30 * time.Second // Kubernetes' default
				if g := pod.TerminationGracePeriodSeconds; g != nil {
					grace = time.Duration(*g) * time.Second
				}
				if need := drain + abort + stopTimeout; grace <= need {
					t.Errorf("terminationGracePeriodSeconds %s does not exceed --drain-timeout=%s + the %s Abort + the %s stop = %s", grace, drain, abort, stopTimeout, need)
				}
			})

			t.Run("mounts", func(t *testing.T) {
				vols := map[string]corev1.Volume{}
				for _, v := range pod.Volumes {
					vols[v.Name] = v
				}
				for _, m := range c.VolumeMounts {
					v, ok := vols[m.Name]
					if !ok {
						t.Errorf("mount %s has no volume", m.Name)
						continue
					}
					if hp := v.HostPath; hp != nil {
						switch hp.Path {
						case "/dev/vfio":
						case "/sys":
							if !m.ReadOnly {
								t.Error("/sys is mounted read-write")
							}
						default:
							t.Errorf("hostPath %s: the agent needs /dev/vfio and /sys only", hp.Path)
						}
					}
				}
				sc := c.SecurityContext
				if sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
					t.Error("the root filesystem is writable")
				}
			})
		})
	}
}

// checkImage fails unless image names a tag other than latest (or a
// digest).
func checkImage(t *testing.T, image string) {
	t.Helper()
	if strings.Contains(image, "@sha256:") {
		return
	}
	slash := strings.LastIndex(image, "/")
	_, tag, ok := strings.Cut(image[slash+1:], ":")
	if !ok || tag == "" {
		t.Errorf("image %q has no tag", image)
	} else if tag == "latest" {
		t.Errorf("image %q: pin a version, never latest", image)
	}
}

// TestOverlaysDiffer checks where dev and production must differ.
func TestOverlaysDiffer(t *testing.T) {
	dev, prod := render(t, "dev"), render(t, "production")
	dds, dc := dev.agentDaemonSet(t)
	pds, pc := prod.agentDaemonSet(t)
	df, pf := flags(t, dc.Args), flags(t, pc.Args)

	t.Run("transport", func(t *testing.T) {
		if _, ok := df["insecure"]; !ok {
			t.Error("dev: no --insecure (it has no certificates)")
		}
		for _, flag := range []string{"insecure", "allow-sim"} {
			if _, ok := pf[flag]; ok {
				t.Errorf("production: --%s", flag)
			}
		}
		for _, flag := range []string{"tls-cert", "tls-key", "tls-ca"} {
			if _, ok := df[flag]; ok {
				t.Errorf("dev: --%s with --insecure", flag)
			}
			path, ok := pf[flag]
			if !ok {
				t.Errorf("production: no --%s", flag)
				continue
			}
			if !fromSecret(pds, pc, path) {
				t.Errorf("production: --%s=%s is not in a volume mounted from a Secret", flag, path)
			}
		}
	})

	t.Run("devices", func(t *testing.T) {
		if _, ok := df["allow-sim"]; !ok {
			t.Error("dev: no --allow-sim (kind has no VFIO devices)")
		}
		for _, flag := range []string{"devices", "allow-client"} {
			v, ok := pf[flag]
			if !ok {
				t.Errorf("production: no --%s", flag)
				continue
			}
			m := envRef.FindStringSubmatch(v)
			if m == nil {
				t.Errorf("production: --%s=%s does not come from the ConfigMap", flag, v)
				continue
			}
			if !fromConfigMap(prod, pc, m[1]) {
				t.Errorf("production: $(%s) is not a key of a rendered ConfigMap", m[1])
			}
		}
	})

	t.Run("privilege", func(t *testing.T) {
		dsc, psc := dc.SecurityContext, pc.SecurityContext
		if dsc == nil || (dsc.Privileged != nil && *dsc.Privileged) || dsc.RunAsNonRoot == nil || !*dsc.RunAsNonRoot ||
			dsc.AllowPrivilegeEscalation == nil || *dsc.AllowPrivilegeEscalation ||
			dsc.Capabilities == nil || !slices.Contains(dsc.Capabilities.Drop, "ALL") {
			t.Errorf("dev: simulated devices need no privilege: want non-root, no escalation, all capabilities dropped; got %+v", dsc)
		}
		if psc == nil || psc.Privileged == nil || !*psc.Privileged {
			t.Error("production: not privileged; the device cgroup then refuses /dev/vfio")
		}
		if hostPaths(dds) != nil {
			t.Errorf("dev: host paths %v for simulated devices", hostPaths(dds))
		}
		if got := hostPaths(pds); !slices.Equal(got, []string{"/dev/vfio", "/sys"}) {
			t.Errorf("production: host paths %v, want /dev/vfio and /sys", got)
		}
	})

	t.Run("images and sizes", func(t *testing.T) {
		if dc.Image == pc.Image {
			t.Errorf("both overlays run %s: a dev build must not be the production image", dc.Image)
		}
		if strings.Contains(pc.Image, "dev") {
			t.Errorf("production runs %s", pc.Image)
		}
		dm, pm := dc.Resources.Limits[corev1.ResourceMemory], pc.Resources.Limits[corev1.ResourceMemory]
		if dm.Cmp(pm) >= 0 {
			t.Errorf("dev memory limit %s is not below production's %s", dm.String(), pm.String())
		}
		if _, ok := pds.Spec.Template.Spec.NodeSelector["vfio-ferry.io/agent"]; !ok {
			t.Error("production: no node selector label: the agent would run on every node")
		}
	})
}

// fromSecret reports whether path lies in a volume of c mounted from a
// Secret.
func fromSecret(ds *appsv1.DaemonSet, c *corev1.Container, path string) bool {
	for _, m := range c.VolumeMounts {
		if !strings.HasPrefix(path, strings.TrimSuffix(m.MountPath, "/")+"/") {
			continue
		}
		for _, v := range ds.Spec.Template.Spec.Volumes {
			if v.Name == m.Name && v.Secret != nil && v.Secret.SecretName != "" {
				return true
			}
		}
	}
	return false
}

// fromConfigMap reports whether c's environment variable name comes from a
// key of a ConfigMap the overlay renders.
func fromConfigMap(r *rendered, c *corev1.Container, name string) bool {
	for _, e := range c.Env {
		if e.Name != name || e.ValueFrom == nil || e.ValueFrom.ConfigMapKeyRef == nil {
			continue
		}
		ref := e.ValueFrom.ConfigMapKeyRef
		for _, cm := range r.configMaps {
			if _, ok := cm.Data[ref.Key]; ok && cm.Name == ref.Name {
				return true
			}
		}
	}
	return false
}

// hostPaths lists the pod's hostPath volumes, sorted.
func hostPaths(ds *appsv1.DaemonSet) []string {
	var out []string
	for _, v := range ds.Spec.Template.Spec.Volumes {
		if v.HostPath != nil {
			out = append(out, v.HostPath.Path)
		}
	}
	slices.Sort(out)
	return out
}

// TestFlagsParse makes sure the test's own flag parser rejects what it
// must, so the checks above cannot pass by accident.
func TestFlagsParse(t *testing.T) {
	got := flags(t, []string{"agent", "--a=1", "--b"})
	if fmt.Sprint(got) != "map[a:1 b:]" {
		t.Errorf("flags = %v", got)
	}
	if port(t, "x", "$(NODE_IP):7101") != 7101 {
		t.Error("port")
	}
	if size(t, "2GiB") != 2<<30 || size(t, "16MiB") != 16<<20 {
		t.Error("size")
	}
}
