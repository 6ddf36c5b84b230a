#!/bin/sh
# /init of Ferry's real-kernel test VM (busybox sh, run as PID 1).
#
# Loads the VFIO modules and ferry_mig, creates mdev instances, runs the
# cases named in the kernel command line's ferry_cases= (default: all),
# times each, and prints one line the host parses:
#
#   FERRY-VM-RESULT kernel=6.12.95+deb12-amd64 init_s=2.03 cases_s=14.2 \
#     migrate=pass migrate_s=3.1 migrate_bytes=67110016 ... precopy=skip precopy_why=noprecopy ...
#
# then powers off. Every step runs under a timeout so a hang ends the VM
# instead of stalling it; the host also bounds the whole boot.
#
# A case is a function case_NAME: it logs what it does, records its
# figures with `fig KEY VALUE` (reported as NAME_KEY=VALUE) and returns 0
# to pass, 1 to fail (after logging why) or 2 to skip (after `fig why
# CODE`). To add a case, write case_NAME, add NAME to ALL_CASES below and
# teach run.sh's report_case to print its figures. Cases run in the order
# of ALL_CASES; close must stay last (it stops the agents).

export PATH=/bin:/sbin
export HOME=/root

ALL_CASES=migrate,precopy,corrupt,walk,sizes,preflight,vmm,close

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /root
mount -t tmpfs tmpfs /tmp
ip link set lo up

log() { echo "ferry-vm: $*"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }
# elapsed FROM: seconds of uptime since FROM, two decimals.
elapsed() { awk -v a="$1" -v b="$(uptime_s)" 'BEGIN { printf "%.2f", b - a }'; }

RESULT=""
add() { RESULT="$RESULT $*"; }
CUR=""
# fig KEY VALUE: a figure of the current case (no spaces in VALUE).
fig() { add "${CUR}_$1=$2"; }

INIT_AT=$(uptime_s)
# finish reports, and counts the kernel's warnings and oopses: the
# console is quiet, and a WARN_ON in the driver must fail the run.
finish() {
	add "cases_s=$(elapsed "$INIT_AT")"
	warnings=$(dmesg | grep -cE 'WARNING:|BUG:|Oops|Call Trace:')
	add "kernel_warnings=$warnings"
	[ "$warnings" -eq 0 ] || dmesg | grep -E -B2 -A24 'WARNING:|BUG:|Oops' | head -80
	echo "FERRY-VM-RESULT${RESULT}"
	log "finished at uptime $(uptime_s)s"
	sync
	poweroff -f
	sleep 10
}

log "init at uptime ${INIT_AT}s, kernel $(uname -r)"
add "kernel=$(uname -r) init_s=$INIT_AT"
CASES=$(sed -n 's/.*ferry_cases=\([^ ]*\).*/\1/p' /proc/cmdline)
[ -n "$CASES" ] || CASES=$ALL_CASES
has_case() { case ",$CASES," in *",$1,"*) return 0 ;; esac; return 1; }

for m in vfio vfio_iommu_type1 mdev ferry_mig; do
	if ! modprobe "$m"; then
		log "modprobe $m failed"
		dmesg | tail -20
		add "modules=fail"
		finish
	fi
done

TYPES=/sys/class/mdev_bus/ferry_mig/mdev_supported_types
PARAM=/sys/module/ferry_mig/parameters/state_size
MDEV=/sys/bus/mdev/devices
# The PRE_COPY types exist on kernels with PRE_COPY (6.2 and later).
PRECOPY=""
[ -d "$TYPES/ferry_mig-precopy" ] && PRECOPY=1
add "precopy_types=${PRECOPY:-0}"

# create TYPE UUID: a new ferry_mig instance of the current state_size.
create() {
	echo "$2" >"$TYPES/ferry_mig-$1/create" || { log "creating $1 instance $2 failed"; return 1; }
	[ -c "/dev/vfio/$(basename "$(readlink "$MDEV/$2/iommu_group")")" ]
}
attr() { cat "$MDEV/$1/migration/$2"; }
# field KEY UUID ATTR: the KEY=value field of a key=value attribute.
field() { attr "$2" "$3" | tr ' ' '\n' | sed -n "s/^$1=//p"; }

# Fixed UUIDs make every instance's content the same on every run.
SRC=f3a1c0de-0001-4000-8000-000000000001
DST=f3a1c0de-0001-4000-8000-000000000002
SRC2=f3a1c0de-0002-4000-8000-000000000001
DST2=f3a1c0de-0002-4000-8000-000000000002
SRC3=f3a1c0de-0004-4000-8000-000000000001
DST3=f3a1c0de-0004-4000-8000-000000000002
# The VMM case's pairs: verified, corrupted, source agent killed.
VMM_SRC=f3a1c0de-0005-4000-8000-000000000001
VMM_DST=f3a1c0de-0005-4000-8000-000000000002
VMM_SRC2=f3a1c0de-0006-4000-8000-000000000001
VMM_DST2=f3a1c0de-0006-4000-8000-000000000002
VMM_SRC3=f3a1c0de-0007-4000-8000-000000000001
VMM_DST3=f3a1c0de-0007-4000-8000-000000000002
WALK_P2P=f3a1c0de-0003-4000-8000-000000000001
WALK_SC=f3a1c0de-0003-4000-8000-000000000002
WALK_PC=f3a1c0de-0003-4000-8000-000000000003
WALK_PCN=f3a1c0de-0003-4000-8000-000000000004

log "state_size $(cat $PARAM) bytes"
INSTANCES=""
new() { create "$1" "$2" && INSTANCES="$INSTANCES $2"; }
new p2p $SRC && new p2p $DST && new p2p $SRC2 && new p2p $DST2 || { add "instances=fail"; finish; }
for u in $VMM_SRC $VMM_DST $VMM_SRC2 $VMM_DST2 $VMM_SRC3 $VMM_DST3; do
	new p2p $u || { add "instances=fail"; finish; }
done
if [ -n "$PRECOPY" ]; then
	new precopy $SRC3 && new precopy $DST3 || { add "instances=fail"; finish; }
fi
# Walk instances: two whole blocks and a short one.
echo 135168 >$PARAM
new p2p $WALK_P2P && new stopcopy $WALK_SC || { add "instances=fail"; finish; }
WALK_DEVS="mdev:$WALK_P2P,mdev:$WALK_SC"
PRECOPY_DEVS=""
if [ -n "$PRECOPY" ]; then
	new precopy $WALK_PC && new precopy-nop2p $WALK_PCN || { add "instances=fail"; finish; }
	PRECOPY_DEVS="mdev:$WALK_PC,mdev:$WALK_PCN"
	WALK_DEVS="$WALK_DEVS,$PRECOPY_DEVS"
fi
# The power-on images of the destinations, for the close case.
for u in $DST $DST2 $DST3 $VMM_DST; do
	[ -d "$MDEV/$u" ] && attr $u digest >"/tmp/power.$u"
done
log "instances ready at uptime $(uptime_s)s:$INSTANCES"

# port_listening PORT: a TCP socket listens on PORT (from /proc/net/tcp).
port_listening() {
	hex=$(printf '%04X' "$1")
	grep -q ":$hex 00000000:0000 0A" /proc/net/tcp
}

AGENTS_UP=""
start_agents() {
	[ -n "$AGENTS_UP" ] && return 0
	if [ ! -x /bin/ferry ]; then
		log "no ferry binary in the image"
		return 1
	fi
	# --devices: agents serve only the host devices their allowlist names.
	# --vmm-socket: VMMs lend their devices there (the vmm case).
	ferry dest --listen 127.0.0.1:7001 --data-listen 127.0.0.1:7003 --insecure --devices 'mdev:*' \
		--vmm-socket /tmp/dest-vmm.sock >/tmp/dest.log 2>&1 &
	DEST_PID=$!
	ferry source --listen 127.0.0.1:7002 --insecure --devices 'mdev:*' \
		--vmm-socket /tmp/source-vmm.sock >/tmp/source.log 2>&1 &
	SOURCE_PID=$!
	i=0
	until port_listening 7001 && port_listening 7002; do
		i=$((i + 1))
		if [ $i -gt 300 ]; then
			log "agents did not start listening"
			tail -20 /tmp/dest.log /tmp/source.log
			return 1
		fi
		sleep 0.1
	done
	AGENTS_UP=1
}

# stop_agents ends both agents (SIGTERM, then SIGKILL after 10 s) and
# waits for them: their devices' last fds are closed then.
stop_agents() {
	[ -n "$AGENTS_UP" ] || return 0
	kill "$DEST_PID" "$SOURCE_PID" 2>/dev/null
	i=0
	while [ -d "/proc/$DEST_PID" ] || [ -d "/proc/$SOURCE_PID" ]; do
		i=$((i + 1))
		[ $i -eq 100 ] && kill -9 "$DEST_PID" "$SOURCE_PID" 2>/dev/null
		[ $i -gt 150 ] && { log "agents did not exit"; return 1; }
		sleep 0.1
	done
	wait "$DEST_PID" "$SOURCE_PID" 2>/dev/null
	AGENTS_UP=""
}

# migrate SRC DST OUT [ARGS...]: ferry migrate between two instances over
# 4 channels; JSON to OUT, stderr to OUT.err.
migrate() {
	src=$1 dst=$2 out=$3
	shift 3
	timeout 300 ferry migrate --source 127.0.0.1:7002 --dest 127.0.0.1:7001 \
		--src-device "mdev:$src" --dest-device "mdev:$dst" \
		--channels 4 --insecure --json "$@" >"$out" 2>"$out.err"
}

# json KEY FILE: the scalar value of KEY in the JSON ferry migrate --json
# prints: the first line "KEY": value, at any indentation.
json() {
	sed -n "s/^ *\"$1\": \"\{0,1\}\([^,\"]*\)\"\{0,1\},\{0,1\}\$/\1/p" "$2" | head -1
}

# agent_logs: the end of both agents' logs and the driver's messages.
agent_logs() {
	tail -20 /tmp/source.log /tmp/dest.log "$@"
	dmesg | grep ferry_mig | tail -10
}

case_migrate() {
	log "mdev:$SRC -> mdev:$DST (STOP_COPY|P2P, stop-copy, 4 channels)"
	start_agents || return 1
	migrate $SRC $DST /tmp/m1.json
	rc=$?
	cat /tmp/m1.json
	verified=$(json verified /tmp/m1.json)
	direct=$(json direct_data /tmp/m1.json)
	fig bytes "$(json bytes /tmp/m1.json)"
	fig seconds "$(json duration_seconds /tmp/m1.json)"
	fig downtime "$(json downtime_seconds /tmp/m1.json)"
	saved=$(field digest $SRC saved)
	got=$(attr $DST digest)
	fig digest "$got"
	log "rc=$rc verified=$verified direct_data=$direct; source $(attr $SRC state), saved image $saved; dest $(attr $DST state), image $got"
	# Informational: how many of our instances the source agent lists.
	timeout 30 ferry devices --agent 127.0.0.1:7002 --insecure >/tmp/devices.txt 2>&1
	cat /tmp/devices.txt
	fig listed "$(grep -c 'mdev:f3a1c0de-' /tmp/devices.txt)"
	fig instances "$(echo $INSTANCES | wc -w)"
	# The agent holds the destination (its registry keeps devices open),
	# so the loaded image is still there to compare.
	if [ $rc -ne 0 ] || [ "$verified" != true ] || [ "$direct" != true ] || [ "$saved" != "$got" ]; then
		log "want rc 0, verified, direct data, and the destination holding the source's saved image"
		agent_logs /tmp/m1.json.err
		return 1
	fi
	# The let-go rule: the agents hold the instances they opened until
	# ferry release, so a VMM's open of the group fails until then.
	if ferry vmm attach --socket /tmp/source-vmm.sock --name letgo --open "mdev:$SRC" >/tmp/letgo0.log 2>&1; then
		log "a VMM opened mdev:$SRC while the agent held it"
		return 1
	fi
	fig held_open "$(grep -o 'device or resource busy\|EBUSY' /tmp/letgo0.log | head -1 | tr ' ' '-')"
	timeout 30 ferry release --source 127.0.0.1:7002 --insecure "mdev:$SRC" || return 1
	timeout 30 ferry release --dest 127.0.0.1:7001 --insecure "mdev:$DST" || return 1
	vmm_attach source letgo $SRC /tmp/letgo1.log || return 1
	vmm_stop $VMM_PID
	fig released_own_fd "$(own_state /tmp/letgo1.log)"
	[ "$(own_state /tmp/letgo1.log)" = RUNNING ] || { log "after ferry release: $(cat /tmp/letgo1.log)"; return 1; }
	fig dest_after_release "$(attr $DST state)"
	[ "$(attr $DST state)" = RUNNING ] || { log "mdev:$DST is $(attr $DST state) after the agent let go, want RUNNING (reset on close)"; return 1; }
	return 0
}

# Pre-copy: the source rewrites blocks at DIRTY_RATE while it runs, and
# once its first pass has sent block 0, block 0 is rewritten on purpose,
# so at least one block must be sent again and the destination must end
# with the image of the switchover, not of the first pass.
DIRTY_RATE=4194304

# force_rewrite UUID: rewrite block 0 of UUID once the saving stream has
# sent it, while the device is still in PRE_COPY (runs in the background;
# prints "rewrote" or why not).
force_rewrite() {
	i=0
	while [ $i -lt 600 ]; do
		state=$(attr "$1" state)
		recs=$(field records "$1" saved)
		case "$state" in
		PRE_COPY*)
			if [ "${recs:-0}" -ge 2 ] && echo 0 >"$MDEV/$1/migration/dirty" 2>/dev/null; then
				echo rewrote
				return 0
			fi
			;;
		STOP_COPY | STOP)
			[ $i -gt 0 ] && { echo "missed: device in $state"; return 1; }
			;;
		esac
		i=$((i + 1))
		sleep 0.05
	done
	echo "missed: no PRE_COPY within 30s"
	return 1
}

case_precopy() {
	if [ -z "$PRECOPY" ]; then
		log "skipped: kernel $(uname -r) has no PRE_COPY (it came with 6.2)"
		fig why noprecopy
		return 2
	fi
	log "mdev:$SRC3 -> mdev:$DST3 (STOP_COPY|P2P|PRE_COPY, pre-copy, dirty rate $DIRTY_RATE B/s, downtime limit 1s)"
	start_agents || return 1
	nblocks=$(( ($(attr $SRC3 size) + $(attr $SRC3 block_size) - 1) / $(attr $SRC3 block_size) ))
	before=$(attr $SRC3 rewrites)
	echo $DIRTY_RATE >"$MDEV/$SRC3/migration/dirty_rate"
	force_rewrite $SRC3 >/tmp/rewrite.txt &
	rewriter=$!
	migrate $SRC3 $DST3 /tmp/m3.json --mode precopy --downtime-limit 1s --precopy-timeout 120s
	rc=$?
	wait $rewriter
	echo 0 >"$MDEV/$SRC3/migration/dirty_rate"
	cat /tmp/m3.json
	verified=$(json verified /tmp/m3.json)
	trigger=$(json switchover_trigger /tmp/m3.json)
	predicted=$(json predicted_downtime_seconds /tmp/m3.json)
	note=$(json prediction_note /tmp/m3.json)
	records=$(field records $SRC3 saved)
	saved=$(field digest $SRC3 saved)
	got=$(attr $DST3 digest)
	fig bytes "$(json bytes /tmp/m3.json)"
	fig seconds "$(json duration_seconds /tmp/m3.json)"
	fig precopy_bytes "$(json precopy_bytes /tmp/m3.json)"
	fig stopcopy_bytes "$(json stopcopy_bytes /tmp/m3.json)"
	fig predicted "${predicted:-none}"
	fig downtime "$(json downtime_seconds /tmp/m3.json)"
	fig trigger "${trigger:-none}"
	fig rate $DIRTY_RATE
	fig rewrites $(($(attr $SRC3 rewrites) - before))
	fig resent $((records - nblocks))
	log "rc=$rc verified=$verified trigger=$trigger predicted=${predicted:-none} ($note); forced rewrite: $(cat /tmp/rewrite.txt)"
	log "source sent $records records for $nblocks blocks, saved image $saved; dest $(attr $DST3 state), image $got, loaded: $(attr $DST3 loaded)"
	why=""
	[ $rc -eq 0 ] && [ "$verified" = true ] || why="$why; the migration did not verify"
	[ "$trigger" = downtime_limit ] || why="$why; switchover trigger '$trigger', want downtime_limit"
	[ -n "$predicted" ] || why="$why; no downtime prediction ($note)"
	[ "$saved" = "$got" ] || why="$why; the destination does not hold the source's final image"
	[ "$records" -gt "$nblocks" ] || why="$why; no block was sent twice"
	grep -q '^rewrote$' /tmp/rewrite.txt || why="$why; the forced rewrite $(cat /tmp/rewrite.txt)"
	[ -z "$why" ] && return 0
	log "FAIL${why}"
	agent_logs /tmp/m3.json.err
	return 1
}

case_corrupt() {
	# Flip one byte 1 MiB + 123 into the source's stream (inside block
	# 15's data): the destination must refuse RESUMING -> STOP and the
	# source must be RUNNING again, which the agent (holding it) did.
	log "mdev:$SRC2 -> mdev:$DST2, stream byte 1048699 flipped"
	start_agents || return 1
	echo 1048699 >"$MDEV/$SRC2/migration/corrupt"
	migrate $SRC2 $DST2 /tmp/m2.json
	rc=$?
	echo -1 >"$MDEV/$SRC2/migration/corrupt"
	cat /tmp/m2.json
	verified=$(json verified /tmp/m2.json)
	state=$(attr $SRC2 state)
	why=$(attr $DST2 last_error)
	fig source_state "$state"
	fig refused "$(echo "$why" | tr ' ' '-')"
	log "rc=$rc verified=$verified; source $state; dest $(attr $DST2 state), last_error: $why"
	case "$why" in *"mismatch at stream byte 1048699"*) refused=1 ;; *) refused="" ;; esac
	if [ $rc -ne 0 ] && [ "$verified" != true ] && [ "$state" = RUNNING ] && [ -n "$refused" ]; then
		return 0
	fi
	log "want a failed migration, the destination naming the flipped byte, the source RUNNING"
	agent_logs /tmp/m2.json.err
	return 1
}

# vfio_test OUT DEVICES REGEXP: pkg/vfio's kernel tests on DEVICES.
vfio_test() {
	FERRY_TEST_VFIO_DEVICES="$2" timeout 300 /bin/vfio.test -test.run "$3" -test.v -test.count=1 >"$1" 2>&1
}

case_walk() {
	log "pkg/vfio TestKernelDevice, TestKernelWalk, TestKernelResetOnClose on $WALK_DEVS"
	vfio_test /tmp/walk.log "$WALK_DEVS" '^TestKernel(Device|Walk|ResetOnClose)$'
	rc=$?
	grep -E '^ *(--- |kernel_linux_test)|^(PASS|FAIL|WALK)' /tmp/walk.log | tail -40
	pairs=$(sed -n 's/^WALK pairs=\([0-9]*\) arcs=[0-9]*$/\1/p' /tmp/walk.log)
	arcs=$(sed -n 's/^WALK pairs=[0-9]* arcs=\([0-9]*\)$/\1/p' /tmp/walk.log)
	fig pairs "${pairs:-0}"
	fig arcs "${arcs:-0}"
	fig devices "$(echo "$WALK_DEVS" | tr ',' '\n' | wc -l)"
	[ $rc -eq 0 ] && [ -n "$pairs" ] && return 0
	tail -60 /tmp/walk.log
	return 1
}

case_sizes() {
	if [ -z "$PRECOPY" ]; then
		log "skipped: kernel $(uname -r) has no PRE_COPY, MIG_DATA_SIZE or VFIO_MIG_GET_PRECOPY_INFO (they came with 6.2)"
		fig why noprecopy
		return 2
	fi
	log "pkg/vfio TestKernelPrecopy on $PRECOPY_DEVS"
	vfio_test /tmp/sizes.log "$PRECOPY_DEVS" '^TestKernelPrecopy$'
	rc=$?
	grep -E '^ *(--- |kernel_linux_test)|^(PASS|FAIL|PRECOPY)' /tmp/sizes.log | tail -40
	line=$(grep '^PRECOPY ' /tmp/sizes.log | head -1)
	for kv in ${line#PRECOPY }; do
		case "$kv" in full=* | initial=* | dirty=* | stopcopy=*) fig "${kv%%=*}" "${kv#*=}" ;; esac
	done
	fig devices "$(grep -c '^PRECOPY ' /tmp/sizes.log)"
	[ $rc -eq 0 ] && [ "$(grep -c '^PRECOPY ' /tmp/sizes.log)" -eq 2 ] && return 0
	tail -60 /tmp/sizes.log
	return 1
}

case_preflight() {
	# Instances of two mdev types: ferry preflight names the type, and a
	# migration between them is refused before the source instance
	# leaves RUNNING (its driver saw no SET request at all).
	log "preflight mdev:$SRC2 (ferry_mig-p2p) -> mdev:$DST2 (p2p) and -> mdev:$WALK_SC (ferry_mig-stopcopy)"
	start_agents || return 1
	why=""
	timeout 60 ferry preflight --source 127.0.0.1:7002 --dest 127.0.0.1:7001 --insecure \
		--src-device "mdev:$SRC2" --dest-device "mdev:$DST2" >/tmp/pf1.txt 2>&1 || why="$why; same types refused: $(cat /tmp/pf1.txt)"
	cat /tmp/pf1.txt
	if timeout 60 ferry preflight --source 127.0.0.1:7002 --dest 127.0.0.1:7001 --insecure \
		--src-device "mdev:$SRC2" --dest-device "mdev:$WALK_SC" >/tmp/pf2.txt 2>&1; then
		why="$why; another mdev type passed"
	fi
	cat /tmp/pf2.txt
	grep -q 'field mdev_type' /tmp/pf2.txt || why="$why; the refusal does not name mdev_type"
	fig refused_field "$(sed -n 's/.*(field \([a-z_]*\)).*/\1/p' /tmp/pf2.txt | head -1)"
	before=$(attr $SRC2 trace)
	migrate $SRC2 $WALK_SC /tmp/m8.json
	rc=$?
	after=$(attr $SRC2 trace)
	grep -q INCOMPATIBLE_DEVICE /tmp/m8.json /tmp/m8.json.err || why="$why; the migration was not refused with INCOMPATIBLE_DEVICE"
	[ $rc -ne 0 ] || why="$why; the migration between types succeeded"
	[ "$before" = "$after" ] && [ "$(attr $SRC2 state)" = RUNNING ] || why="$why; the source instance was moved: trace $after, state $(attr $SRC2 state)"
	fig source_state "$(attr $SRC2 state)"
	[ -z "$why" ] && return 0
	log "FAIL${why}"
	agent_logs /tmp/m8.json.err
	return 1
}

# vmm_attach ROLE NAME UUID LOG [ARGS...]: a test VMM opens instance
# UUID through its VFIO group, as QEMU does, and lends its device fd to
# the ROLE (source or dest) agent as vmm:NAME, printing every event to
# LOG; VMM_PID is its pid.
vmm_attach() {
	role=$1 name=$2 uuid=$3 out=$4
	shift 4
	ferry vmm attach --socket "/tmp/$role-vmm.sock" --name "$name" --open "mdev:$uuid" "$@" >"$out" 2>&1 &
	VMM_PID=$!
	wait_line "$out" '^attached ' || { log "test VMM $name did not attach"; cat "$out"; return 1; }
}

# wait_line FILE REGEXP: wait (up to 60 s) for a line of FILE to match.
wait_line() {
	i=0
	until grep -q "$2" "$1" 2>/dev/null; do
		i=$((i + 1))
		[ $i -gt 1200 ] && return 1
		sleep 0.05
	done
}

# vmm_stop PID: end a test VMM (it detaches and prints its own fd's
# state) and wait for it.
vmm_stop() {
	kill "$1" 2>/dev/null
	wait "$1" 2>/dev/null
}

# own_state LOG: the state the test VMM read on its own fd at exit.
own_state() { sed -n 's/^own fd state: //p' "$1" | tail -1; }

# migrate_vmm NAME OUT: ferry migrate from the source's vmm:NAME to the
# destination's vmm:NAME.
migrate_vmm() {
	timeout 300 ferry migrate --source 127.0.0.1:7002 --dest 127.0.0.1:7001 \
		--src-device "vmm:$1" --dest-device "vmm:$1" --channels 4 --insecure --json >"$2" 2>"$2.err"
}

case_vmm() {
	start_agents || return 1
	why=""
	# 1. A verified migration of lent devices: the destination VMM gets
	# its device in STOP with the source's image loaded, and the config
	# blob the source VMM attached.
	head -c 300000 /dev/urandom >/tmp/vmm-cfg.bin
	log "test VMMs lend mdev:$VMM_SRC and mdev:$VMM_DST as vmm:vm1, with a 300000-byte config blob"
	vmm_attach source vm1 $VMM_SRC /tmp/vmm1-src.log --config-file /tmp/vmm-cfg.bin || return 1
	SRC_VMM=$VMM_PID
	vmm_attach dest vm1 $VMM_DST /tmp/vmm1-dst.log --config-out /tmp/vmm-cfg.out || return 1
	DST_VMM=$VMM_PID
	migrate_vmm vm1 /tmp/m5.json
	rc=$?
	cat /tmp/m5.json
	fig bytes "$(json bytes /tmp/m5.json)"
	fig seconds "$(json duration_seconds /tmp/m5.json)"
	wait_line /tmp/vmm1-dst.log 'config_received=' || why="$why; the destination VMM got no config state"
	saved=$(field digest $VMM_SRC saved)
	got=$(attr $VMM_DST digest)
	st=$(attr $VMM_DST state)
	cmp -s /tmp/vmm-cfg.bin /tmp/vmm-cfg.out && fig config_bytes "$(wc -c </tmp/vmm-cfg.out)" || why="$why; the config blob differs"
	log "rc=$rc; destination $st, image $got, source saved $saved"
	[ $rc -eq 0 ] && [ "$(json verified /tmp/m5.json)" = true ] || why="$why; migration rc $rc, not verified"
	[ "$st" = STOP ] && [ "$saved" = "$got" ] || why="$why; destination in $st with image $got, want STOP with $saved"
	vmm_stop $DST_VMM
	vmm_stop $SRC_VMM
	fig dest_own_fd "$(own_state /tmp/vmm1-dst.log)"
	[ "$(own_state /tmp/vmm1-dst.log)" = STOP ] || why="$why; the destination VMM's own fd read $(own_state /tmp/vmm1-dst.log), want STOP"
	cat /tmp/vmm1-src.log /tmp/vmm1-dst.log

	# 2. A failed migration (a corrupted stream): the source VMM's own
	# fd reads RUNNING afterwards.
	log "vmm:vm2 from mdev:$VMM_SRC2, stream byte 1048699 flipped"
	echo 1048699 >"$MDEV/$VMM_SRC2/migration/corrupt"
	vmm_attach source vm2 $VMM_SRC2 /tmp/vmm2-src.log || return 1
	SRC_VMM=$VMM_PID
	vmm_attach dest vm2 $VMM_DST2 /tmp/vmm2-dst.log || return 1
	DST_VMM=$VMM_PID
	migrate_vmm vm2 /tmp/m6.json
	rc=$?
	echo -1 >"$MDEV/$VMM_SRC2/migration/corrupt"
	vmm_stop $SRC_VMM
	vmm_stop $DST_VMM
	fig failed_own_fd "$(own_state /tmp/vmm2-src.log)"
	[ $rc -ne 0 ] && [ "$(own_state /tmp/vmm2-src.log)" = RUNNING ] ||
		why="$why; failed migration rc $rc, source VMM's own fd $(own_state /tmp/vmm2-src.log), want a failure and RUNNING"

	# 3. The source agent killed mid-STOP_COPY: its VMM sees the socket
	# close and returns the device to RUNNING by its own fd.
	log "vmm:vm3 from mdev:$VMM_SRC3 (100 ms per read), source agent killed in STOP_COPY"
	echo 100 >"$MDEV/$VMM_SRC3/migration/read_delay_ms"
	vmm_attach source vm3 $VMM_SRC3 /tmp/vmm3-src.log --recover || return 1
	SRC_VMM=$VMM_PID
	vmm_attach dest vm3 $VMM_DST3 /tmp/vmm3-dst.log || return 1
	DST_VMM=$VMM_PID
	migrate_vmm vm3 /tmp/m7.json &
	MIG_PID=$!
	if wait_line /tmp/vmm3-src.log 'state=STOP_COPY'; then
		kill -9 "$SOURCE_PID"
		wait_line /tmp/vmm3-src.log '^own fd state' || why="$why; the source VMM did not recover"
	else
		why="$why; vmm:vm3 never reached STOP_COPY"
	fi
	# ferry migrate would wait for the source agent to come back.
	kill $MIG_PID 2>/dev/null
	wait $MIG_PID 2>/dev/null
	wait "$SOURCE_PID" 2>/dev/null
	echo 0 >"$MDEV/$VMM_SRC3/migration/read_delay_ms"
	vmm_stop $SRC_VMM
	vmm_stop $DST_VMM
	cat /tmp/vmm3-src.log
	fig killed_own_fd "$(own_state /tmp/vmm3-src.log)"
	[ "$(own_state /tmp/vmm3-src.log)" = RUNNING ] && grep -q '^recovered by own fd: STOP_COPY -> RUNNING' /tmp/vmm3-src.log ||
		why="$why; after the source agent died the source VMM's own fd read $(own_state /tmp/vmm3-src.log), want STOP_COPY recovered to RUNNING"
	# A new source agent for the cases after this one.
	ferry source --listen 127.0.0.1:7002 --insecure --devices 'mdev:*' --vmm-socket /tmp/source-vmm.sock >/tmp/source.log 2>&1 &
	SOURCE_PID=$!

	[ -z "$why" ] && return 0
	log "FAIL${why}"
	agent_logs /tmp/m5.json.err /tmp/m6.json.err /tmp/m7.json.err
	return 1
}

case_close() {
	# Reset on close: once the agents exit, the last fd of each device
	# is closed and every instance is RUNNING with its power-on image.
	log "stopping the agents: every instance must be RUNNING with its power-on image"
	stop_agents || return 1
	bad=""
	n=0
	for u in $DST $DST2 $DST3 $VMM_DST; do
		[ -d "$MDEV/$u" ] || continue
		want=$(cat "/tmp/power.$u")
		st=$(attr $u state)
		got=$(attr $u digest)
		log "$u: $st, image $got (power-on $want), loaded before: $(attr $u loaded)"
		[ "$st" = RUNNING ] && [ "$got" = "$want" ] || bad="$bad $u"
		n=$((n + 1))
	done
	for u in $INSTANCES; do
		[ "$(attr $u state)" = RUNNING ] || bad="$bad $u:$(attr $u state)"
	done
	fig checked "$n"
	[ -z "$bad" ] && return 0
	log "not reset on close:$bad"
	return 1
}

for c in $(echo "$ALL_CASES" | tr ',' ' '); do
	has_case "$c" || continue
	CUR=$c
	log "case $c"
	t=$(uptime_s)
	"case_$c"
	rc=$?
	case $rc in 0) v=pass ;; 2) v=skip ;; *) v=fail ;; esac
	add "$c=$v"
	fig s "$(elapsed "$t")"
	log "case $c: $v in $(elapsed "$t")s"
done

finish
