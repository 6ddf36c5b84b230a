#!/usr/bin/env bash
# Ferry's real-kernel test: boots Debian's kernels under QEMU - bookworm's
# 6.1 and bookworm-backports' 6.12 - and, inside each, migrates the state
# of ferry_mig mdev devices (our own emulated VFIO device, test/vm/module)
# with the real ferry binary.
#
# On a fresh Debian bookworm machine it:
#   1. installs what it needs from Debian's packages (qemu-system-x86,
#      busybox-static, cpio, kmod, gcc-12, make, xz-utils) when a tool is
#      missing;
#   2. per kernel, resolves the version through the linux-headers-amd64
#      meta package, downloads the image, headers and kbuild packages with
#      apt-get download and unpacks them (nothing is installed) under
#      .cache/vm/<kernel>/. 6.1 comes from the machine's own apt sources;
#      6.12 from bookworm-backports, through a private apt configuration
#      whose sources file is written here at run time with the archive URI
#      of the machine's own sources (.cache/vm/apt-bookworm-backports/);
#      6.12's .ko.xz modules are decompressed for busybox;
#   3. builds ferry_mig.ko per kernel, a static ferry and the pkg/vfio test
#      binary once;
#   4. per kernel, packs an initramfs with busybox, the VFIO modules and
#      test/vm/init.sh, boots it with qemu-system-x86_64 (TCG unless the CPU
#      has vmx/svm and /dev/kvm is usable) under a timeout, and judges the
#      run by the FERRY-VM-RESULT line the guest prints: QEMU exits 0 even
#      after a guest panic.
#
# Cases (all by default; FERRY_VM_CASES=walk,... picks some; init.sh has
# them):
#   migrate  ferry migrate (stop-copy) between two 64 MiB instances over 4
#            channels; verified, and the destination holds the source's image
#   precopy  ferry migrate --mode precopy from a PRE_COPY instance that
#            rewrites blocks as it runs; verified against the final image,
#            switched over by --downtime-limit on a prediction (6.2+ only)
#   corrupt  the source's stream has one byte flipped: the migration fails
#            (the destination refuses RESUMING -> STOP) and the source
#            instance is RUNNING again
#   walk     pkg/vfio's TestKernelDevice, TestKernelWalk and
#            TestKernelResetOnClose on one small instance per mdev type:
#            every (from, to) request compared with vfio.Path
#   sizes    pkg/vfio's TestKernelPrecopy: MIG_DATA_SIZE and
#            VFIO_MIG_GET_PRECOPY_INFO read and checked byte for byte on the
#            PRE_COPY instances (6.2+ only)
#   preflight ferry preflight between instances of two mdev types names
#            mdev_type, and ferry migrate between them is refused before the
#            source instance leaves RUNNING
#   vmm      the VMM path: test VMMs (ferry vmm attach) open instances
#            through their groups and lend their fds and a config blob to
#            the agents' --vmm-socket; a verified migration leaves the
#            destination VMM's device in STOP with the image and the blob;
#            after a failed one, and after the source agent is killed
#            mid-STOP_COPY, the source VMM's own fd reads RUNNING
#   close    the agents exit: every instance is RUNNING again and the
#            destinations have dropped their loaded images (reset on close)
# On 6.1 precopy and sizes are skipped (6.1 has no PRE_COPY); on 6.12 a
# skip is a failure.
#
# Environment: FERRY_VM_KERNELS (6.1,6.12 by default; a list of series),
# FERRY_VM_KVER (one exact kernel, for example 6.1.0-57-amd64 or
# 6.12.95+deb12-amd64; it overrides FERRY_VM_KERNELS), FERRY_VM_CASES,
# FERRY_VM_ACCEL (tcg|kvm), FERRY_VM_TIMEOUT (seconds per boot, default
# 600). Output: test/vm/build/ (per kernel: console.log, the module, the
# initramfs).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VMDIR=$ROOT/test/vm
CACHE=$ROOT/.cache/vm
BUILD=$VMDIR/build
ALL_CASES=migrate,precopy,corrupt,walk,sizes,preflight,vmm,close
CASES=${FERRY_VM_CASES:-$ALL_CASES}
TIMEOUT=${FERRY_VM_TIMEOUT:-600}
KERNELS=${FERRY_VM_KERNELS:-6.1,6.12}

T0=$(date +%s.%N)
say() { printf 'vm-test: %s\n' "$*"; }
die() {
	say "FAIL: $*" >&2
	exit 1
}
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
has_case() { [[ ",$CASES," == *",$1,"* ]]; }

# install_tools installs the Debian packages of any missing tool.
install_tools() {
	local pkgs=()
	command -v qemu-system-x86_64 >/dev/null || pkgs+=(qemu-system-x86)
	command -v cpio >/dev/null || pkgs+=(cpio)
	command -v depmod >/dev/null || [[ -x /sbin/depmod ]] || pkgs+=(kmod)
	command -v gcc-12 >/dev/null || pkgs+=(gcc-12)
	command -v make >/dev/null || pkgs+=(make)
	command -v xz >/dev/null || pkgs+=(xz-utils)
	# A static busybox: the initramfs has no shared libraries.
	if [[ ! -x /bin/busybox ]] || ldd /bin/busybox >/dev/null 2>&1; then
		pkgs+=(busybox-static)
	fi
	# The kbuild tools (modpost, objtool) link against libelf.
	dpkg -s libelf1 >/dev/null 2>&1 || pkgs+=(libelf1)
	((${#pkgs[@]} == 0)) && return 0
	[[ $(id -u) == 0 ]] || die "missing packages ${pkgs[*]}: install them as root"
	say "installing ${pkgs[*]}"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
}

# archive_uri prints the URI of the machine's Debian archive: the source
# whose suites include bookworm, from debian.sources (deb822) or
# sources.list (one-line).
archive_uri() {
	local uri=""
	if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
		uri=$(awk '
			/^[ \t]*$/ { u = "" }
			/^URIs:/ { u = $2 }
			/^Suites:/ { for (i = 2; i <= NF; i++) if ($i == "bookworm" && u != "") { print u; exit } }
		' /etc/apt/sources.list.d/debian.sources)
	fi
	if [[ -z $uri && -f /etc/apt/sources.list ]]; then
		uri=$(awk '$1 == "deb" {
			i = 2
			if ($i ~ /^\[/) while ($i !~ /\]$/) i++
			if ($i ~ /\]$/ && $2 ~ /^\[/) i++
			if ($(i + 1) == "bookworm") { print $i; exit }
		}' /etc/apt/sources.list)
	fi
	[[ -n $uri ]] || return 1
	printf '%s\n' "$uri"
}

# apt_config SERIES sets APT (the apt options for the series' suite) and
# SUITE. 6.1 is the machine's own bookworm; 6.12 is bookworm-backports,
# reached through a private configuration written here.
apt_config() {
	case $1 in
	6.1)
		SUITE=bookworm
		APT=()
		;;
	6.12)
		SUITE=bookworm-backports
		local dir=$CACHE/apt-$SUITE uri
		mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
		if uri=$(archive_uri); then
			printf 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s %s main\n' \
				"$uri" "$SUITE" >"$dir/sources.list"
		elif [[ ! -f $dir/sources.list ]]; then
			say "no Debian bookworm archive in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list"
		fi
		APT=(-o "Dir::Etc::sourcelist=$dir/sources.list" -o Dir::Etc::sourceparts=/nonexistent
			-o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache")
		;;
	*) die "unknown kernel series $1 (want 6.1 or 6.12)" ;;
	esac
}

declare -A UPDATED=()
apt_update() {
	[[ -n ${UPDATED[$SUITE]:-} ]] && return 0
	UPDATED[$SUITE]=1
	say "apt-get update ($SUITE)"
	apt-get "${APT[@]}" update -qq || say "apt-get update ($SUITE) failed"
}

# meta_version prints the version of linux-headers-amd64 in SUITE.
meta_version() {
	if [[ $SUITE == bookworm ]]; then
		apt-cache "${APT[@]}" policy linux-headers-amd64 2>/dev/null | sed -n 's/^ *Candidate: //p' | grep -v '(none)'
	else
		apt-cache "${APT[@]}" madison linux-headers-amd64 2>/dev/null |
			awk -F' *[|] *' -v s="$SUITE/" 'index($3, s) { print $2; exit }'
	fi
}

# resolve_kernel SERIES sets KVER (6.1.0-NN-amd64, 6.12.N+deb12-amd64),
# KPKGVER (its package version) and PKGS (the packages to download),
# through the meta package linux-headers-amd64. With FERRY_VM_KVER, or
# without package lists, it falls back to what is unpacked already.
resolve_kernel() {
	local series=$1 meta="" try
	KVER=${FERRY_VM_KVER:-}
	KPKGVER="" PKGS=()
	apt_config "$series"
	if [[ -z $KVER ]]; then
		for try in 1 2; do
			meta=$(meta_version || true)
			[[ -n $meta ]] && break
			[[ $try == 1 ]] && apt_update
		done
		if [[ -n $meta ]]; then
			read -r KVER KPKGVER < <(apt-cache "${APT[@]}" show "linux-headers-amd64=$meta" 2>/dev/null |
				sed -n "s/^Depends:.*linux-headers-\($series\.[^ ,]*-amd64\) (= \([^)]*\)).*/\1 \2/p" | head -1) || true
		fi
	fi
	if [[ -z $KVER ]]; then
		# No package lists (offline?): the newest kernel already unpacked.
		KVER=$(ls "$CACHE" 2>/dev/null | grep -E "^${series//./\\.}\.[0-9].*-amd64\$" | sort -V | tail -1 || true)
		[[ -n $KVER ]] || die "no Debian $series kernel package found in $SUITE"
	fi
	[[ $KVER == "$series".* ]] || die "kernel $KVER is not of series $series"
	KROOT=$CACHE/$KVER/root
	HDR=$KROOT/usr/src/linux-headers-$KVER
}

# kernel_packages sets KPKGVER and PKGS from the headers package's own
# dependencies (its -common part and its kbuild package).
kernel_packages() {
	if [[ -z $KPKGVER ]]; then
		KPKGVER=$(apt-cache "${APT[@]}" policy "linux-headers-$KVER" 2>/dev/null | sed -n 's/^ *Candidate: //p')
		[[ -n $KPKGVER && $KPKGVER != "(none)" ]] || return 1
	fi
	local deps
	deps=$(apt-cache "${APT[@]}" show "linux-headers-$KVER=$KPKGVER" 2>/dev/null | sed -n 's/^Depends: //p' | head -1)
	local common kbuild
	common=$(grep -o 'linux-headers-[^ ,]*-common' <<<"$deps" | head -1 || true)
	kbuild=$(grep -o 'linux-kbuild-[^ ,]*' <<<"$deps" | head -1 || true)
	[[ -n $common && -n $kbuild ]] || return 1
	PKGS=("linux-image-$KVER=$KPKGVER" "linux-headers-$KVER=$KPKGVER" "$common=$KPKGVER" "$kbuild=$KPKGVER")
}

# fetch_kernel downloads and unpacks the kernel image and headers once. A
# failed download is tried again after refreshing the package lists (the
# mirror drops superseded kernel versions).
fetch_kernel() {
	[[ -f $KROOT/.complete ]] && return 0
	download_kernel && return 0
	[[ -z ${UPDATED[$SUITE]:-} ]] || die "downloading the $KVER packages failed"
	apt_update
	# With fresh lists the meta package may name a newer kernel.
	[[ -n ${FERRY_VM_KVER:-} ]] || resolve_kernel "$SERIES"
	[[ -f $KROOT/.complete ]] && return 0
	download_kernel || die "downloading the $KVER packages failed"
}

download_kernel() {
	if ! kernel_packages; then
		say "no packages for linux-headers-$KVER in $SUITE"
		return 1
	fi
	local debs=$CACHE/$KVER/debs
	rm -rf "$debs" "$KROOT"
	mkdir -p "$debs" "$KROOT"
	say "downloading ${PKGS[*]}"
	(cd "$debs" && apt-get "${APT[@]}" download -q -o APT::Sandbox::User=root "${PKGS[@]}" >/dev/null) || return 1
	# (set -e does not apply here: the caller tests the status.)
	local d
	for d in "$debs"/linux-headers-*.deb "$debs"/linux-kbuild-*.deb; do
		dpkg -x "$d" "$KROOT" || return 1
	done
	# Only the kernel and its VFIO modules from the image.
	local m=./lib/modules/$KVER
	dpkg-deb --fsys-tarfile "$debs"/linux-image-"$KVER"_*.deb | tar -x -C "$KROOT" \
		"./boot/vmlinuz-$KVER" "$m/kernel/drivers/vfio" \
		"$m/modules.order" "$m/modules.builtin" "$m/modules.builtin.modinfo" || return 1
	# 6.12 ships .ko.xz: busybox gets them decompressed.
	find "$KROOT/lib/modules" -name '*.ko.xz' -exec xz -d {} + || return 1
	# The headers' Makefile includes the common part by absolute path.
	sed -i "s#^include /usr/src/#include $KROOT/usr/src/#" "$HDR/Makefile" || return 1
	rm -f "$debs"/linux-image-*.deb
	touch "$KROOT/.complete"
}

build_module() {
	local out=$KBUILD/module
	rm -rf "$out"
	mkdir -p "$out"
	cp "$VMDIR/module/ferry_mig.c" "$VMDIR/module/Kbuild" "$out/"
	# No module BTF: it needs pahole and a vmlinux, and nothing here reads it.
	make -s -C "$HDR" M="$out" CONFIG_DEBUG_INFO_BTF_MODULES= modules 2>&1 |
		grep -v 'Skipping BTF generation' || true
	[[ -f $out/ferry_mig.ko ]] || die "ferry_mig.ko did not build for $KVER"
}

build_go() {
	local flags=(-trimpath -ldflags=-s\ -w)
	rm -f "$BUILD/ferry" "$BUILD/vfio.test"
	if has_case migrate || has_case precopy || has_case corrupt || has_case close; then
		(cd "$ROOT" && CGO_ENABLED=0 go build "${flags[@]}" -o "$BUILD/ferry" ./cmd/ferry) ||
			die "building ./cmd/ferry failed"
	fi
	if has_case walk || has_case sizes; then
		(cd "$ROOT" && CGO_ENABLED=0 go test -c "${flags[@]}" -o "$BUILD/vfio.test" ./pkg/vfio) ||
			die "building the pkg/vfio test binary failed"
	fi
}

pack_initramfs() {
	local dir=$KBUILD/initramfs m=lib/modules/$KVER a
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
	cp "$KBUILD/module/ferry_mig.ko" "$dir/$m/extra/"
	"$(command -v depmod || echo /sbin/depmod)" -b "$dir" "$KVER"
	install -m 0755 "$VMDIR/init.sh" "$dir/init"
	for a in ferry vfio.test; do
		if [[ -f $BUILD/$a ]]; then cp "$BUILD/$a" "$dir/bin/"; fi
	done
	# Uncompressed: the guest unpacks it faster than it would gunzip it.
	(cd "$dir" && find . -print0 | cpio --null -o -H newc --quiet) >"$KBUILD/initramfs.cpio"
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
	local t rc=0
	t=$(date +%s.%N)
	timeout -k 10 "$TIMEOUT" qemu-system-x86_64 -accel "$accel" -m 2048 -smp 2 \
		-nodefaults -no-reboot -display none -monitor none -net none -serial stdio \
		-kernel "$KROOT/boot/vmlinuz-$KVER" -initrd "$KBUILD/initramfs.cpio" \
		-append "console=ttyS0 quiet panic=-1 ferry_cases=$CASES" \
		</dev/null 2>&1 | tr -d '\r' | tee "$KBUILD/console.log" || rc=$?
	VM_SECONDS=$(since "$t")
	[[ $rc == 0 ]] || say "qemu ended with status $rc after ${VM_SECONDS}s"
}

declare -A R=()
# r KEY: a value of the guest's result line, or - when it has none.
r() { printf '%s' "${R[$1]:--}"; }
# rs KEY: a value in seconds, to the millisecond.
rs() { awk -v x="$(r "$1")" 'BEGIN { if (x ~ /^[0-9.eE+-]+$/) printf "%.3f", x; else printf "%s", x }'; }

# report_case CASE prints the case's verdict and figures.
report_case() {
	local c=$1 v
	v=$(r "$c")
	case $v in
	skip)
		[[ $(r "${c}_why") == noprecopy ]] &&
			say "  $c: skipped: $KVER has no PRE_COPY, MIG_DATA_SIZE or VFIO_MIG_GET_PRECOPY_INFO (6.2 and later)" ||
			say "  $c: skipped ($(r "${c}_why"))"
		return
		;;
	-) v=missing ;;
	esac
	local t
	t=$(r "${c}_s")
	case $c in
	migrate) say "  migrate: $v in $t s: $(r migrate_bytes) bytes in $(rs migrate_seconds) s over 4 channels (downtime $(rs migrate_downtime) s); the destination holds the source's image $(r migrate_digest); the source agent lists $(r migrate_listed) of the $(r migrate_instances) instances; held open until ferry release ($(r migrate_held_open | tr '-' ' ')), then a VMM opens the source ($(r migrate_released_own_fd)) and the destination is reset ($(r migrate_dest_after_release))" ;;
	precopy) say "  precopy: $v in $t s: $(r precopy_bytes) bytes in $(rs precopy_seconds) s, $(r precopy_precopy_bytes) pre-copy + $(r precopy_stopcopy_bytes) stop-copy; downtime predicted $(rs precopy_predicted) s, measured $(rs precopy_downtime) s (trigger $(r precopy_trigger)); dirty rate $(r precopy_rate) B/s: $(r precopy_rewrites) block rewrites, $(r precopy_resent) blocks sent again, final image verified" ;;
	corrupt) say "  corrupt: $v in $t s: refused ($(r corrupt_refused | tr '-' ' ')), source instance $(r corrupt_source_state)" ;;
	walk) say "  walk: $v in $t s: $(r walk_pairs) (from, to) requests, $(r walk_arcs) arcs checked against vfio.Path on $(r walk_devices) instances (one per flag set)" ;;
	sizes) say "  sizes: $v in $t s: $(r sizes_devices) PRE_COPY instances; MIG_DATA_SIZE $(r sizes_full) in RUNNING, PRECOPY_INFO initial $(r sizes_initial), dirty $(r sizes_dirty) after 2 rewrites, stop-copy rest $(r sizes_stopcopy), all exact" ;;
	preflight) say "  preflight: $v in $t s: another mdev type refused (field $(r preflight_refused_field)), and the migration between them refused before the source instance left $(r preflight_source_state)" ;;
	vmm) say "  vmm: $v in $t s: lent devices migrated, $(r vmm_bytes) bytes in $(rs vmm_seconds) s, $(r vmm_config_bytes) bytes of config state delivered, destination VMM's fd $(r vmm_dest_own_fd); source VMM's fd after a failed migration $(r vmm_failed_own_fd), after the source agent was killed mid-STOP_COPY $(r vmm_killed_own_fd)" ;;
	close) say "  close: $v in $t s: agents gone, every instance RUNNING, $(r close_checked) destinations back to their power-on image" ;;
	*) say "  $c: $v in $t s" ;;
	esac
}

# judge reads the guest's result line, prints the verdicts and adds them
# to PASSED and FAILED.
judge() {
	local line kv c
	line=$(grep '^FERRY-VM-RESULT' "$KBUILD/console.log" | tail -1 || true)
	if [[ -z $line ]]; then
		say "$KVER: no FERRY-VM-RESULT line from the guest (timeout or panic; see $KBUILD/console.log)"
		FAILED=$((FAILED + 1))
		return
	fi
	R=()
	for kv in ${line#FERRY-VM-RESULT}; do
		R[${kv%%=*}]=${kv#*=}
	done
	say "$KVER: guest reached /init at $(r init_s) s of uptime; cases ran $(r cases_s) s; VM ran ${VM_SECONDS} s"
	local pass=0 fail=0 skip=0
	if [[ $(r modules) == fail || $(r instances) == fail ]]; then
		say "  setup failed: modules $(r modules), instances $(r instances) (see $KBUILD/console.log)"
		fail=$((fail + 1))
	fi
	if [[ $(r kernel_warnings) != 0 ]]; then
		say "  the kernel logged $(r kernel_warnings) warnings or oopses (see $KBUILD/console.log)"
		fail=$((fail + 1))
	fi
	for c in ${CASES//,/ }; do
		report_case "$c"
		case $(r "$c") in
		pass) pass=$((pass + 1)) ;;
		skip)
			if [[ $SERIES == 6.1 && $(r "${c}_why") == noprecopy ]]; then
				skip=$((skip + 1))
			else
				say "  $c: a skip on $KVER is a failure"
				fail=$((fail + 1))
			fi
			;;
		*) fail=$((fail + 1)) ;;
		esac
	done
	say "$KVER: $pass passed, $fail failed, $skip skipped"
	PASSED=$((PASSED + pass)) FAILED=$((FAILED + fail)) SKIPPED=$((SKIPPED + skip))
}

for c in ${CASES//,/ }; do
	[[ ",$ALL_CASES," == *",$c,"* ]] || die "unknown case $c (want some of $ALL_CASES)"
done
if [[ -n ${FERRY_VM_KVER:-} ]]; then
	case $FERRY_VM_KVER in
	6.1.*) KERNELS=6.1 ;;
	6.12.*) KERNELS=6.12 ;;
	*) die "FERRY_VM_KVER=$FERRY_VM_KVER: want a 6.1 or 6.12 kernel" ;;
	esac
fi
mkdir -p "$BUILD" "$CACHE"
PASSED=0 FAILED=0 SKIPPED=0
t=$(date +%s.%N)
install_tools
declare -A KV=()
for SERIES in ${KERNELS//,/ }; do
	resolve_kernel "$SERIES"
	fetch_kernel
	KV[$SERIES]=$KVER
done
build_go
say "tools, kernels (${KV[*]}) and binaries ready in $(since "$t") s"
SUMMARY=()
for SERIES in ${KERNELS//,/ }; do
	KVER=${KV[$SERIES]}
	apt_config "$SERIES"
	KROOT=$CACHE/$KVER/root HDR=$CACHE/$KVER/root/usr/src/linux-headers-$KVER KBUILD=$BUILD/$KVER
	t=$(date +%s.%N)
	build_module
	pack_initramfs
	say "$KVER: built the module and the initramfs ($(du -h "$KBUILD/initramfs.cpio" | cut -f1)) in $(since "$t") s"
	boot
	judge
	SUMMARY+=("$KVER: boot to /init $(r init_s) s, cases $(r cases_s) s, VM $VM_SECONDS s")
done
for l in "${SUMMARY[@]}"; do say "$l"; done
say "whole test $(since "$T0") s"
say "$PASSED passed, $FAILED failed, $SKIPPED skipped"
((FAILED == 0))
