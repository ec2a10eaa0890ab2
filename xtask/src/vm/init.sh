#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/sbin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
mount -t securityfs securityfs /sys/kernel/security
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
exec 3>/dev/ttyS1

# section NAME FILE: FILE's contents as section NAME.
section() { echo "@@begin $1" >&3; cat "$2" >&3; echo "@@end $1" >&3; }
# Setup failures are collected, not fatal: the host reports them.
try() { "$@" 2>>/tmp/setup || echo "$* failed: exit $?" >>/tmp/setup; }

# tcprst writes "ready" to --ready-fd once its programs are attached;
# under TCG that takes seconds.
attached() {
    for _ in $(seq 600); do
        grep -q '^ready$' /tmp/ready && return 0
        kill -0 "$1" 2>/dev/null || return 1
        usleep 100000
    done
    return 1
}

# trace PLAN ARGS...: `tcprst trace ARGS` around every scenario; -v for
# each hook's line, which the host judges.
trace() {
    plan=$1
    shift
    : >/tmp/ready
    tcprst trace -v -o json --ready-fd 4 "$@" >/tmp/out 2>/tmp/err 4>/tmp/ready &
    pid=$!
    : >/tmp/scenarios
    if attached "$pid"; then
        while read -r scenario; do
            tcprst-loadgen scenario "$scenario" >>/tmp/scenarios 2>/tmp/why ||
                echo "$scenario: exit $?: $(cat /tmp/why)" >>/tmp/scenarios
        done </vm/scenarios
        # The last records reach userspace.
        sleep 1
    fi
    kill -INT "$pid" 2>/dev/null
    wait "$pid"
    echo $? >/tmp/status
    section "$plan.out" /tmp/out
    section "$plan.err" /tmp/err
    section "$plan.status" /tmp/status
    section "$plan.scenarios" /tmp/scenarios
}

: >/tmp/setup
try ip link set lo up
for module in $(cat /vm/load-order); do
    try insmod "/vm/modules/$module.ko"
done
port=$(cat /vm/nft-reject-port)
try nft add table inet tcprst
try nft add chain inet tcprst input '{ type filter hook input priority 0; }'
try nft add rule inet tcprst input tcp dport "$port" reject with tcp reset
section setup /tmp/setup

tcprst doctor -o json >/tmp/doctor 2>/tmp/err
section doctor /tmp/doctor
section doctor.err /tmp/err

# PLAN ARGS...: every plan, even one the kernel should refuse: the host
# checks that it does.
while read -r plan args; do
    trace "$plan" $args </dev/null
done </vm/plans
echo @@done >&3
poweroff -f
