#!/bin/busybox sh
# /init of the reclaimd test guest: loads the virtio modules, starts the QEMU guest agent, then
# runs the workload named on the kernel command line (in the background) and serves line
# commands on the second serial port.
# Lines starting "RECLAIMD-GUEST: " on the console (ttyS0) are markers the host waits for.
# Memory is allocated as files in a tmpfs: it shows in MemFree and also counts as Shmem.

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
/bin/busybox mkdir -p /proc /sys /dev /sbin /usr/bin /usr/sbin /alloc
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

# Words come from the command line and the control channel: never glob them.
set -f
MIB=1048576
# What an allocation must leave available, so the guest's own processes never meet the OOM killer.
RESERVE_MIB=48
CR=$(printf '\r')
CTL=/alloc/ctl
WL=/alloc/workload
MODULES=/lib/modules
AGENT=/usr/sbin/qemu-ga
AGENT_PORT_NAME=org.qemu.guest_agent.0
AGENT_PIDFILE=/run/qemu-ga.pid
AGENT_LOG=/run/qemu-ga.log

say() { echo "RECLAIMD-GUEST: $*"; }

# The value of a kernel command line parameter: empty when absent, "1" for a bare flag.
param() {
	for word in $(cat /proc/cmdline); do
		case "$word" in
		"$1") echo 1; return ;;
		"$1"=*) echo "${word#*=}"; return ;;
		esac
	done
}

meminfo_kib() {
	while read -r key value unit; do
		[ "$key" = "$1:" ] && { echo "$value"; return; }
	done </proc/meminfo
}

reporting_order() {
	cat /sys/module/page_reporting/parameters/page_reporting_order 2>/dev/null || echo none
}

balloon_state() {
	if ls /sys/bus/virtio/drivers/virtio_balloon 2>/dev/null | grep -q '^virtio'; then
		echo bound
	elif [ -d /sys/module/virtio_balloon ]; then
		echo no-device
	else
		echo not-loaded
	fi
}

is_count() { case "$1" in '' | *[!0-9]*) return 1 ;; esac; [ "$1" -gt 0 ]; }

allocated_mib() {
	total=0
	for f in $(ls "$1"); do total=$((total + $(stat -c %s "$1/$f"))); done
	echo $((total / MIB))
}

# alloc DIR MIB: one new file of MIB MiB in DIR. On failure $err says why.
alloc() {
	if ! is_count "$2"; then err="not a positive MiB count: '$2'"; return 1; fi
	avail=$(($(meminfo_kib MemAvailable) / 1024))
	if [ "$2" -gt $((avail - RESERVE_MIB)) ]; then
		err="$2 MiB exceeds MemAvailable $avail MiB less a $RESERVE_MIB MiB reserve"
		return 1
	fi
	seq=$(($(cat "$1.seq" 2>/dev/null || echo 0) + 1))
	echo "$seq" >"$1.seq"
	f="$1/$(printf %08d "$seq")"
	if ! dd if=/dev/zero of="$f" bs=1M count="$2" 2>/dev/null; then
		rm -f "$f"
		err="dd failed"
		return 1
	fi
}

# free_mib DIR [MIB]: free MIB MiB (all when empty), newest allocation first; sets $freed.
free_mib() {
	freed=0
	for f in $(ls -r "$1"); do
		[ -n "$2" ] && [ "$freed" -ge "$2" ] && break
		size=$(($(stat -c %s "$1/$f") / MIB))
		if [ -z "$2" ] || [ $((freed + size)) -le "$2" ]; then
			rm -f "$1/$f"
			freed=$((freed + size))
		else
			truncate -s $(((size - ($2 - freed)) * MIB)) "$1/$f"
			freed=$2
		fi
	done
}

# Sets $port to the /dev/vportNpM whose virtio-serial port the host named
# org.qemu.guest_agent.0 (no udev, so no /dev/virtio-ports/ symlink). The host names its ports
# shortly after virtio_console binds, so wait up to 5 s when a virtio-serial device is there.
# Globs and shell builtins only: under TCG every forked process costs tens of milliseconds.
agent_port() {
	port=
	bound=
	set +f
	for dev in /sys/bus/virtio/drivers/virtio_console/virtio*; do [ -e "$dev" ] && bound=1; done
	tries=0
	while [ -n "$bound" ] && [ -z "$port" ] && [ "$tries" -lt 50 ]; do
		for dir in /sys/class/virtio-ports/vport*; do
			name=
			[ -r "$dir/name" ] && read -r name <"$dir/name"
			[ "$name" = "$AGENT_PORT_NAME" ] && port=/dev/${dir##*/}
		done
		[ -n "$port" ] || sleep 0.1
		tries=$((tries + 1))
	done
	set -f
	[ -n "$port" ]
}

# Sets $pid to qemu-ga's pid; fails when it is not running.
agent_pid() {
	pid=
	[ -r $AGENT_PIDFILE ] && read -r pid <$AGENT_PIDFILE
	[ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

# start_agent [BLOCKED-RPCS]: qemu-ga on the agent port, as a daemon; on failure $err says why.
start_agent() {
	if ! agent_port; then err="no virtio-serial port named $AGENT_PORT_NAME"; return 1; fi
	rm -f $AGENT_PIDFILE
	# -d: the parent exits at once; the child writes the pidfile, then opens the port.
	$AGENT -m virtio-serial -p "$port" -t /run -f $AGENT_PIDFILE -l $AGENT_LOG -d \
		${1:+--block-rpcs=$1} 3<&- || { err="qemu-ga exited with $?"; return 1; }
	tries=0
	while [ "$tries" -lt 100 ]; do
		agent_pid && return 0
		tries=$((tries + 1))
		sleep 0.05
	done
	err="qemu-ga is not running (see $AGENT_LOG)"
	return 1
}

stop_agent() {
	agent_pid || return 0
	kill -CONT "$pid"
	kill "$pid"
	tries=0
	while kill -0 "$pid" 2>/dev/null && [ "$tries" -lt 50 ]; do
		tries=$((tries + 1))
		sleep 0.1
	done
	rm -f $AGENT_PIDFILE
}

agent_fields() {
	state=stopped
	if agent_pid; then
		{ read -r stat <"/proc/$pid/stat"; } 2>/dev/null
		case "$stat" in
		*") T "*) state=paused ;;
		*) state=running ;;
		esac
	fi
	echo "state=$state pid=${pid:-none} blocked=${agent_blocked:-none}"
}

# One line of /proc/buddyinfo per zone as "NODE:ZONE=c0,c1,...": read by the shell itself, so
# no process is forked (and no memory allocated) between the read and what the host compares.
buddyinfo_line() {
	out=
	while read -r _ node _ zone counts; do
		set -- $counts
		old_ifs=$IFS
		IFS=,
		out="$out ${node%,}:$zone=$*"
		IFS=$old_ifs
	done </proc/buddyinfo
	echo "OK buddyinfo$out"
}

is_guest_path() { case "$1" in /*) [ -e "$1" ] ;; *) return 1 ;; esac; }

status_fields() {
	echo "memtotal_kib=$(meminfo_kib MemTotal) memfree_kib=$(meminfo_kib MemFree)" \
		"memavailable_kib=$(meminfo_kib MemAvailable) shmem_kib=$(meminfo_kib Shmem)" \
		"allocated_mib=$(allocated_mib $CTL) workload_mib=$(allocated_mib $WL)" \
		"page_reporting_order=$(reporting_order) balloon=$(balloon_state)"
}

# One control command in, exactly one reply line out: "OK <verb> ..." or "ERR <verb> ...".
handle() {
	set -- $1
	case "$1" in
	ping) echo "OK ping" ;;
	alloc)
		if alloc $CTL "$2"; then
			echo "OK alloc $2 allocated_mib=$(allocated_mib $CTL) memfree_kib=$(meminfo_kib MemFree)"
		else
			echo "ERR alloc $err"
		fi
		;;
	free)
		if [ -n "$2" ] && ! is_count "$2"; then
			echo "ERR free not a positive MiB count: '$2'"
		else
			free_mib $CTL "$2"
			echo "OK free freed_mib=$freed allocated_mib=$(allocated_mib $CTL)" \
				"memfree_kib=$(meminfo_kib MemFree)"
		fi
		;;
	status) echo "OK status $(status_fields)" ;;
	drop_caches)
		sync
		echo 3 >/proc/sys/vm/drop_caches
		echo "OK drop_caches"
		;;
	compact)
		echo 1 >/proc/sys/vm/compact_memory
		echo "OK compact"
		;;
	buddyinfo) buddyinfo_line ;;
	agent)
		case "$2" in
		status) echo "OK agent $(agent_fields)" ;;
		start)
			stop_agent
			agent_blocked=$3
			if start_agent "$3"; then echo "OK agent $(agent_fields)"; else echo "ERR agent $err"; fi
			;;
		stop) stop_agent; echo "OK agent $(agent_fields)" ;;
		pause | resume)
			if agent_pid; then
				if [ "$2" = pause ]; then kill -STOP "$pid"; else kill -CONT "$pid"; fi
				echo "OK agent $(agent_fields)"
			else
				echo "ERR agent qemu-ga is not running"
			fi
			;;
		*) echo "ERR agent expected status, start [BLOCKED-RPCS], stop, pause or resume" ;;
		esac
		;;
	mask)
		# mask PATH BASE64: the guest shows other content at PATH (a bind mount), as a tampered
		# guest could; "unmask PATH" undoes it.
		if ! is_guest_path "$2" || [ -z "$3" ]; then
			echo "ERR mask expected an existing absolute path and base64 content"
		else
			seq=$(($(cat /alloc/mask.seq 2>/dev/null || echo 0) + 1))
			echo "$seq" >/alloc/mask.seq
			if echo "$3" | base64 -d >"/alloc/mask.$seq" 2>/dev/null && mount -o bind "/alloc/mask.$seq" "$2"; then
				echo "OK mask $2"
			else
				echo "ERR mask cannot mask $2"
			fi
		fi
		;;
	unmask)
		if is_guest_path "$2" && umount "$2" 2>/dev/null; then echo "OK unmask $2"; else echo "ERR unmask $2 is not masked"; fi
		;;
	poweroff)
		echo "OK poweroff"
		sleep 1
		poweroff -f
		;;
	*) echo "ERR $1 unknown command (ping alloc free status drop_caches compact buddyinfo agent mask unmask poweroff)" ;;
	esac
}

# workload STEPS: see the README for the syntax. Checked whole before the first step runs.
workload() {
	IFS=,
	set -- $1
	IFS=' 	
'
	rounds=1
	n=0
	for step in "$@"; do
		n=$((n + 1))
		case "$step" in
		alloc:*) is_count "${step#*:}" || { say "workload invalid step '$step'"; return; } ;;
		free | free:*) [ "$step" = free ] || is_count "${step#*:}" || { say "workload invalid step '$step'"; return; } ;;
		hold:* | sleep:*)
			case "${step#*:}" in '' | *[!0-9.]*) say "workload invalid step '$step'"; return ;; esac
			;;
		repeat | repeat:*)
			[ "$n" -eq $# ] || { say "workload invalid: '$step' must be the last step"; return; }
			rounds=0
			[ "$step" = repeat ] || rounds=${step#*:}
			[ "$step" = repeat ] || is_count "$rounds" || { say "workload invalid step '$step'"; return; }
			;;
		*) say "workload invalid step '$step'"; return ;;
		esac
	done
	round=1
	while [ "$rounds" -eq 0 ] || [ "$round" -le "$rounds" ]; do
		for step in "$@"; do
			arg=${step#*:}
			case "$step" in
			alloc:*)
				if alloc $WL "$arg"; then
					say "workload round=$round step=$step ok workload_mib=$(allocated_mib $WL)"
				else
					say "workload round=$round step=$step failed: $err"
				fi
				;;
			free*)
				[ "$step" = free ] && arg=
				free_mib $WL "$arg"
				say "workload round=$round step=$step ok freed_mib=$freed"
				;;
			hold:* | sleep:*)
				sleep "$arg"
				say "workload round=$round step=$step ok"
				;;
			esac
		done
		round=$((round + 1))
	done
	say "workload finished"
}

say "init started kernel=$(uname -r)"
noballoon=$(param reclaimd.noballoon)
for m in $(cat $MODULES/load-order); do
	if [ "$m" = virtio_balloon ] && [ -n "$noballoon" ]; then
		say "module $m skipped (reclaimd.noballoon)"
	elif insmod "$MODULES/$m.ko"; then
		say "module $m loaded"
	else
		say "module $m FAILED"
	fi
done
# The balloon driver registers with page reporting while it probes, inside its insmod. Linux 6.1
# then sets the order to pageblock_order whatever the boot parameter said; set it again here.
order=$(param page_reporting.page_reporting_order)
if [ -n "$order" ] && [ "$(balloon_state)" = bound ] && [ "$(reporting_order)" != "$order" ]; then
	echo "$order" >/sys/module/page_reporting/parameters/page_reporting_order &&
		say "page_reporting_order set from the command line"
fi
say "page_reporting_order=$(reporting_order)"
say "balloon=$(balloon_state)"

mkdir -p /run
agent_blocked=$(param reclaimd.agent_block)
if [ -n "$(param reclaimd.noagent)" ]; then
	say "agent skipped (reclaimd.noagent)"
elif start_agent "$agent_blocked"; then
	say "agent started pid=$pid blocked=${agent_blocked:-none}"
elif [ -z "$port" ]; then
	say "agent none (no virtio-serial port named $AGENT_PORT_NAME)"
else
	say "agent FAILED: $err"
fi

mount -t tmpfs -o size=100% alloc /alloc
mkdir -p $CTL $WL

steps=$(param reclaimd.workload)
if [ -n "$steps" ]; then
	say "workload $steps"
	workload "$steps" &
fi

# The port stays open on fd 3 from here on, so nothing the host sends after "ready" is lost.
if (exec 3<>/dev/ttyS1) 2>/dev/null; then
	exec 3<>/dev/ttyS1
	stty raw -echo clocal <&3
	say "ready control=ttyS1"
	while :; do
		while IFS= read -r line <&3; do
			line=${line%"$CR"}
			[ -n "$line" ] && handle "$line" >&3 2>/dev/null
		done
		sleep 1
	done
fi
say "ready control=none"
while :; do sleep 3600; done
