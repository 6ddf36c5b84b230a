#!/usr/bin/env bash
# Ferry's real-kernel test: boots Debian bookworm's 6.1 kernel under QEMU
# and, inside it, migrates the state of ferry_mig mdev devices (our own
# emulated VFIO device, test/vm/module) with the real ferry binary.
#
# On a fresh Debian bookworm machine it:
#   1. installs what it needs from Debian's packages (qemu-system-x86,
#      busybox-static, cpio, kmod, gcc-12, make) when a tool is missing;
#   2. downloads the 6.1 kernel image and headers with apt-get download and
#      unpacks them (nothing is installed) under .cache/vm/<kernel>/;
#   3. builds ferry_mig.ko, a static ferry and the pkg/vfio test binary;
#   4. packs an initramfs with busybox, the VFIO modules and test/vm/init.sh;
#   5. boots it with qemu-system-x86_64 (TCG unless the CPU has vmx/svm and
#      /dev/kvm is usable) under a timeout, and judges the run by the
#      FERRY-VM-RESULT line the guest prints: QEMU exits 0 even after a
#      guest panic.
#
# Cases (all by default; FERRY_VM_CASES=walk,... picks some):
#   migrate  ferry migrate between two 64 MiB instances over 4 channels;
#            verified, and the destination now holds the source's state
#   corrupt  the source's stream has one byte flipped: the migration fails
#            (the destination refuses RESUMING -> STOP) and the source
#            instance is RUNNING again
#   walk     pkg/vfio's TestKernel* tests on two small instances, one per
#            mdev type: every (from, to) request compared with vfio.Path
#
# Environment: FERRY_VM_CASES, FERRY_VM_ACCEL (tcg|kvm), FERRY_VM_TIMEOUT
# (seconds for the whole boot, default 600), FERRY_VM_KVER (for example
# 6.1.0-56-amd64; default: what linux-image-amd64 depends on).
# Output: test/vm/build/ (console.log and the built artefacts).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VMDIR=$ROOT/test/vm
CACHE=$ROOT/.cache/vm
BUILD=$VMDIR/build
CASES=${FERRY_VM_CASES:-migrate,corrupt,walk}
TIMEOUT=${FERRY_VM_TIMEOUT:-600}

T0=$(date +%s.%N)
say() { printf 'vm-test: %s\n' "$*"; }
die() { say "FAIL: $*" >&2; exit 1; }
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
has_case() { [[ ",$CASES," == *",$1,"* ]]; }

APT_UPDATED=""
apt_update() {
	[[ -n $APT_UPDATED ]] && return 0
	apt-get update -qq
	APT_UPDATED=1
}

# install_tools installs the Debian packages of any missing tool.
install_tools() {
	local pkgs=()
	command -v qemu-system-x86_64 >/dev/null || pkgs+=(qemu-system-x86)
	command -v cpio >/dev/null || pkgs+=(cpio)
	command -v depmod >/dev/null || [[ -x /sbin/depmod ]] || pkgs+=(kmod)
	command -v gcc-12 >/dev/null || pkgs+=(gcc-12)
	command -v make >/dev/null || pkgs+=(make)
	# A static busybox: the initramfs has no shared libraries.
	if [[ ! -x /bin/busybox ]] || ldd /bin/busybox >/dev/null 2>&1; then
		pkgs+=(busybox-static)
	fi
	# The kbuild tools (modpost, objtool) link against libelf.
	dpkg -s libelf1 >/dev/null 2>&1 || pkgs+=(libelf1)
	((${#pkgs[@]} == 0)) && return 0
	[[ $(id -u) == 0 ]] || die "missing packages ${pkgs[*]}: install them as root"
	say "installing ${pkgs[*]}"
	apt_update
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
}

# resolve_kernel sets KVER (6.1.0-NN-amd64) and KPKGVER (the package version).
resolve_kernel() {
	KVER=${FERRY_VM_KVER:-}
	if [[ -z $KVER ]]; then
		local try
		for try in 1 2; do
			KVER=$(apt-cache depends linux-image-amd64 2>/dev/null |
				sed -n 's/^ *Depends: linux-image-\(6\.1\.[0-9]*-[0-9]*-amd64\)$/\1/p' | head -1)
			[[ -n $KVER ]] && break
			[[ $try == 1 ]] && apt_update
		done
	fi
	if [[ -z $KVER ]]; then
		# No package lists (offline?): use the newest kernel already unpacked.
		KVER=$(ls "$CACHE" 2>/dev/null | grep -E '^6\.1\.[0-9]+-[0-9]+-amd64$' | sort -V | tail -1 || true)
		[[ -n $KVER ]] || die "no Debian 6.1 kernel package found (this test needs Debian bookworm's apt sources)"
	fi
	KROOT=$CACHE/$KVER/root
	HDR=$KROOT/usr/src/linux-headers-$KVER
}

# fetch_kernel downloads and unpacks the kernel image and headers once. A
# failed download is tried again after refreshing the package lists (the
# mirror drops superseded kernel versions).
fetch_kernel() {
	[[ -f $KROOT/.complete ]] && return 0
	if ! download_kernel; then
		[[ -z $APT_UPDATED ]] || die "downloading the kernel packages failed"
		apt_update
		resolve_kernel
		[[ -f $KROOT/.complete ]] && return 0
		download_kernel || die "downloading the kernel packages failed"
	fi
}

download_kernel() {
	KPKGVER=$(apt-cache policy "linux-image-$KVER" 2>/dev/null | sed -n 's/^ *Candidate: //p')
	if [[ -z $KPKGVER || $KPKGVER == "(none)" ]]; then
		say "no candidate for linux-image-$KVER"
		return 1
	fi
	local debs=$CACHE/$KVER/debs
	rm -rf "$debs" "$KROOT"
	mkdir -p "$debs" "$KROOT"
	say "downloading linux-image-$KVER $KPKGVER and its headers"
	(cd "$debs" && apt-get download -q -o APT::Sandbox::User=root \
		"linux-image-$KVER=$KPKGVER" \
		"linux-headers-$KVER=$KPKGVER" \
		"linux-headers-${KVER%-amd64}-common=$KPKGVER" \
		"linux-kbuild-6.1=$KPKGVER" >/dev/null) || return 1
	# (set -e does not apply here: the caller tests the status.)
	local d
	for d in "$debs"/linux-headers-*.deb "$debs"/linux-kbuild-*.deb; do
		dpkg -x "$d" "$KROOT" || return 1
	done
	# Only the kernel and its VFIO modules from the 70 MB image.
	local m=./lib/modules/$KVER
	dpkg-deb --fsys-tarfile "$debs"/linux-image-"$KVER"_*.deb | tar -x -C "$KROOT" \
		"./boot/vmlinuz-$KVER" "$m/kernel/drivers/vfio" \
		"$m/modules.order" "$m/modules.builtin" "$m/modules.builtin.modinfo" || return 1
	# The headers' Makefile includes the common part by absolute path.
	sed -i "s#^include /usr/src/#include $KROOT/usr/src/#" "$HDR/Makefile" || return 1
	rm -f "$debs"/linux-image-*.deb
	touch "$KROOT/.complete"
}

build_module() {
	rm -rf "$BUILD/module"
	mkdir -p "$BUILD/module"
	cp "$VMDIR/module/ferry_mig.c" "$VMDIR/module/Kbuild" "$BUILD/module/"
	make -s -C "$HDR" M="$BUILD/module" modules 2>&1 | grep -v 'Skipping BTF generation' || true
	[[ -f $BUILD/module/ferry_mig.ko ]] || die "ferry_mig.ko did not build"
}

build_go() {
	local flags=(-trimpath -ldflags=-s\ -w)
	rm -f "$BUILD/ferry" "$BUILD/vfio.test"
	if has_case migrate || has_case corrupt; then
		(cd "$ROOT" && CGO_ENABLED=0 go build "${flags[@]}" -o "$BUILD/ferry" ./cmd/ferry) ||
			die "building ./cmd/ferry failed"
	fi
	if has_case walk; then
		(cd "$ROOT" && CGO_ENABLED=0 go test -c "${flags[@]}" -o "$BUILD/vfio.test" ./pkg/vfio) ||
			die "building the pkg/vfio test binary failed"
	fi
}

pack_initramfs() {
	local dir=$BUILD/initramfs m=lib/modules/$KVER a
	rm -rf "$dir"
	mkdir -p "$dir"/{bin,dev,proc,sys,tmp,root,$m/extra,$m/kernel/drivers/vfio/mdev}
	cp /bin/busybox "$dir/bin/"
	for a in $(/bin/busybox --list); do
		[[ $a == busybox ]] || ln -s busybox "$dir/bin/$a"
	done
	cp "$KROOT/$m/kernel/drivers/vfio/vfio.ko" "$KROOT/$m/kernel/drivers/vfio/vfio_iommu_type1.ko" \
		"$dir/$m/kernel/drivers/vfio/"
	cp "$KROOT/$m/kernel/drivers/vfio/mdev/mdev.ko" "$dir/$m/kernel/drivers/vfio/mdev/"
	cp "$KROOT/$m"/modules.{order,builtin,builtin.modinfo} "$dir/$m/"
	cp "$BUILD/module/ferry_mig.ko" "$dir/$m/extra/"
	"$(command -v depmod || echo /sbin/depmod)" -b "$dir" "$KVER"
	install -m 0755 "$VMDIR/init.sh" "$dir/init"
	for a in ferry vfio.test; do
		if [[ -f $BUILD/$a ]]; then cp "$BUILD/$a" "$dir/bin/"; fi
	done
	# Uncompressed: the guest unpacks it faster than it would gunzip it.
	(cd "$dir" && find . -print0 | cpio --null -o -H newc --quiet) >"$BUILD/initramfs.cpio"
}

boot() {
	local accel=${FERRY_VM_ACCEL:-}
	if [[ -z $accel ]]; then
		accel=tcg
		# KVM only with hardware virtualisation: a paravirtual /dev/kvm
		# (a VM host without vmx/svm) hangs the guest in real mode.
		if grep -qwE 'vmx|svm' /proc/cpuinfo && [[ -r /dev/kvm && -w /dev/kvm ]]; then
			accel=kvm
		fi
	fi
	say "booting $KVER ($accel, timeout ${TIMEOUT}s), cases $CASES"
	local t=$(date +%s.%N) rc=0
	timeout -k 10 "$TIMEOUT" qemu-system-x86_64 -accel "$accel" -m 2048 -smp 2 \
		-nodefaults -no-reboot -display none -monitor none -net none -serial stdio \
		-kernel "$KROOT/boot/vmlinuz-$KVER" -initrd "$BUILD/initramfs.cpio" \
		-append "console=ttyS0 quiet panic=-1 ferry_cases=$CASES" \
		</dev/null 2>&1 | tr -d '\r' | tee "$BUILD/console.log" || rc=$?
	VM_SECONDS=$(since "$t")
	[[ $rc == 0 ]] || say "qemu ended with status $rc after ${VM_SECONDS}s"
}

# judge reads the guest's result line and prints the verdict.
judge() {
	local line
	line=$(grep '^FERRY-VM-RESULT' "$BUILD/console.log" | tail -1 || true)
	[[ -n $line ]] || die "no FERRY-VM-RESULT line from the guest (timeout or panic; see $BUILD/console.log)"
	local -A r=()
	local kv
	for kv in ${line#FERRY-VM-RESULT}; do
		r[${kv%%=*}]=${kv#*=}
	done
	local boot init
	init=$(sed -n 's/^ferry-vm: init at uptime \([0-9.]*\)s.*/\1/p' "$BUILD/console.log")
	local pass=0 fail=0 c
	for c in ${CASES//,/ }; do
		if [[ ${r[$c]:-} == pass ]]; then pass=$((pass + 1)); else fail=$((fail + 1)); fi
	done
	has_case migrate && say "migrate: ${r[migrate]:-missing}: ${r[bytes]:-0} bytes in ${r[seconds]:-0} s over 4 channels; the source agent lists ${r[listed]:-0} of the 6 ferry_mig instances"
	has_case corrupt && say "corrupt: ${r[corrupt]:-missing}: migration refused, source instance ${r[source_state]:-unknown}"
	has_case walk && say "walk: ${r[walk]:-missing}: ${r[pairs]:-0} (from, to) requests, ${r[arcs]:-0} arcs checked against vfio.Path"
	say "guest reached /init at ${init:-?} s of uptime; VM ran ${VM_SECONDS} s; whole test $(since "$T0") s"
	say "$pass passed, $fail failed"
	((fail == 0))
}

for c in ${CASES//,/ }; do
	[[ $c == migrate || $c == corrupt || $c == walk ]] || die "unknown case $c (want migrate, corrupt, walk)"
done
mkdir -p "$BUILD" "$CACHE"
t=$(date +%s.%N); install_tools; resolve_kernel; fetch_kernel; say "tools and kernel $KVER ready in $(since "$t") s"
t=$(date +%s.%N); build_module; build_go; pack_initramfs; say "built module, binaries and initramfs ($(du -h "$BUILD/initramfs.cpio" | cut -f1)) in $(since "$t") s"
boot
judge
