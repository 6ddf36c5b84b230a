#!/bin/sh
# /init of Ferry's real-kernel test VM (busybox sh, run as PID 1).
#
# Loads the VFIO modules and ferry_mig, creates mdev instances, runs the
# cases named in the kernel command line's ferry_cases= (default: all) and
# prints one line the host parses:
#
#   FERRY-VM-RESULT migrate=pass bytes=N seconds=S corrupt=pass source_state=RUNNING walk=pass pairs=N arcs=N
#
# then powers off. Every step runs under a timeout so a hang ends the VM
# instead of stalling it; the host also bounds the whole boot.

export PATH=/bin:/sbin
export HOME=/root

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /root
mount -t tmpfs tmpfs /tmp
ip link set lo up

log() { echo "ferry-vm: $*"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }

RESULT=""
add() { RESULT="$RESULT $*"; }

finish() {
	echo "FERRY-VM-RESULT${RESULT}"
	log "finished at uptime $(uptime_s)s"
	sync
	poweroff -f
	sleep 10
}

log "init at uptime $(uptime_s)s, kernel $(uname -r)"
CASES=$(sed -n 's/.*ferry_cases=\([^ ]*\).*/\1/p' /proc/cmdline)
[ -n "$CASES" ] || CASES=migrate,corrupt,walk
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

# create TYPE UUID: a new ferry_mig instance of the current state_size.
create() {
	echo "$2" >"$TYPES/ferry_mig-$1/create" || { log "creating $1 instance $2 failed"; return 1; }
	[ -c "/dev/vfio/$(basename "$(readlink "$MDEV/$2/iommu_group")")" ]
}
attr() { cat "$MDEV/$1/migration/$2"; }

# Fixed UUIDs make every instance's content the same on every run.
SRC=f3a1c0de-0001-4000-8000-000000000001
DST=f3a1c0de-0001-4000-8000-000000000002
SRC2=f3a1c0de-0002-4000-8000-000000000001
DST2=f3a1c0de-0002-4000-8000-000000000002
WALK_P2P=f3a1c0de-0003-4000-8000-000000000001
WALK_SC=f3a1c0de-0003-4000-8000-000000000002

log "state_size $(cat $PARAM) bytes"
for u in $SRC $DST $SRC2 $DST2; do
	create p2p $u || { add "instances=fail"; finish; }
done
echo 4096 >$PARAM
create p2p $WALK_P2P && create stopcopy $WALK_SC || { add "instances=fail"; finish; }
log "instances ready at uptime $(uptime_s)s"

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
	ferry dest --listen 127.0.0.1:7001 --data-listen 127.0.0.1:7003 --insecure --devices 'mdev:*' >/tmp/dest.log 2>&1 &
	ferry source --listen 127.0.0.1:7002 --insecure --devices 'mdev:*' >/tmp/source.log 2>&1 &
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

# migrate SRC DST OUT: ferry migrate between two instances; JSON to OUT.
migrate() {
	timeout 300 ferry migrate --source 127.0.0.1:7002 --dest 127.0.0.1:7001 \
		--src-device "mdev:$1" --dest-device "mdev:$2" \
		--channels 4 --insecure --json >"$3" 2>/tmp/migrate.err
}

# json KEY FILE: the scalar value of top-level KEY in the indented JSON
# object ferry migrate --json prints (top-level keys are indented by two).
json() {
	sed -n "s/^  \"$1\": \"\{0,1\}\([^,\"]*\)\"\{0,1\},\{0,1\}\$/\1/p" "$2" | head -1
}

if has_case migrate; then
	log "case migrate: mdev:$SRC -> mdev:$DST"
	verdict=fail
	if start_agents; then
		migrate $SRC $DST /tmp/m1.json
		rc=$?
		cat /tmp/m1.json
		verified=$(json verified /tmp/m1.json)
		bytes=$(json bytes /tmp/m1.json)
		secs=$(json duration_seconds /tmp/m1.json)
		direct=$(json direct_data /tmp/m1.json)
		log "migrate rc=$rc verified=$verified direct_data=$direct; source $(attr $SRC state) seed $(attr $SRC seed), dest $(attr $DST state) seed $(attr $DST seed)"
		if [ $rc -eq 0 ] && [ "$verified" = true ] && [ "$direct" = true ] && [ "$(attr $SRC seed)" = "$(attr $DST seed)" ]; then
			verdict=pass
		else
			tail -20 /tmp/migrate.err /tmp/source.log /tmp/dest.log
			dmesg | grep ferry_mig | tail -10
		fi
	fi
	add "migrate=$verdict bytes=${bytes:-0} seconds=${secs:-0}"

	# Informational: how many of our instances the source agent lists.
	if [ -n "$AGENTS_UP" ]; then
		timeout 30 ferry devices --agent 127.0.0.1:7002 --insecure >/tmp/devices.txt 2>&1
		cat /tmp/devices.txt
		add "listed=$(grep -c 'mdev:f3a1c0de-' /tmp/devices.txt)"
	fi
fi

if has_case corrupt; then
	# Flip one byte 1 MiB + 123 into the source's stream: the destination
	# must refuse RESUMING -> STOP and the source must be RUNNING again.
	log "case corrupt: mdev:$SRC2 -> mdev:$DST2, byte 1048699 flipped"
	verdict=fail
	echo 1048699 >"$MDEV/$SRC2/migration/corrupt"
	if start_agents; then
		migrate $SRC2 $DST2 /tmp/m2.json
		rc=$?
		cat /tmp/m2.json
		verified=$(json verified /tmp/m2.json)
		state=$(attr $SRC2 state)
		why=$(attr $DST2 last_error)
		log "migrate rc=$rc verified=$verified; source $state; dest $(attr $DST2 state), last_error: $why"
		case "$why" in *mismatch*) refused=1 ;; *) refused="" ;; esac
		if [ $rc -ne 0 ] && [ "$verified" != true ] && [ "$state" = RUNNING ] && [ -n "$refused" ]; then
			verdict=pass
		else
			tail -20 /tmp/migrate.err /tmp/source.log /tmp/dest.log
		fi
	fi
	add "corrupt=$verdict source_state=${state:-unknown}"
fi

if has_case walk; then
	log "case walk: mdev:$WALK_P2P (STOP_COPY|P2P), mdev:$WALK_SC (STOP_COPY)"
	verdict=fail
	FERRY_TEST_VFIO_DEVICES="mdev:$WALK_P2P,mdev:$WALK_SC" \
		timeout 300 /bin/vfio.test -test.run '^TestKernel' -test.v -test.count=1 >/tmp/walk.log 2>&1
	rc=$?
	grep -E '^ *(--- |kernel_linux_test)|^(PASS|FAIL|WALK)' /tmp/walk.log | tail -40
	w=$(sed -n 's/^WALK pairs=\([0-9]*\) arcs=\([0-9]*\)$/pairs=\1 arcs=\2/p' /tmp/walk.log)
	if [ $rc -eq 0 ] && [ -n "$w" ]; then
		verdict=pass
	else
		tail -60 /tmp/walk.log
	fi
	add "walk=$verdict ${w:-pairs=0 arcs=0}"
fi

finish
