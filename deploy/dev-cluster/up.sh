#!/usr/bin/env bash
# Bring up the local Slurm dev cluster: munge, one slurmdbd on MariaDB, two Slurm clusters (alpha,
# beta) with fake GPUs, and one sshd "login node" per cluster on 127.0.0.1, plus the broker's
# configuration for them in .dev-cluster/broker.toml. See README.md beside this file.
#
# Idempotent: what already runs with the same configuration is reused, so a second run takes about
# two seconds. Every daemon started here leaves a pid file in .dev-cluster/pids/, which down.sh uses.
set -euo pipefail
umask 022
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

main() {
    preflight
    mkdir -p "$STATE"
    lock_state
    "$DEV_DIR/../install-packages.sh"
    make_layout
    start_munge
    ensure_mariadb
    ensure_accounting_db
    ensure_service_account
    ensure_researchers
    write_sudoers
    local c
    for c in "${CLUSTERS[@]}"; do write_cluster_config "$c"; done
    write_slurmdbd_conf
    start_slurmdbd
    # Clusters and associations must be in the database before slurmctld starts, or it runs
    # unregistered and refuses --account.
    register_accounting
    # All controllers and nodes start before any wait: their start-up overlaps.
    for c in "${CLUSTERS[@]}"; do start_slurmctld "$c"; done
    for c in "${CLUSTERS[@]}"; do start_slurmds "$c"; done
    ensure_ssh_keys
    for c in "${CLUSTERS[@]}"; do
        write_sshd_config "$c"
        start_sshd "$c"
    done
    write_broker_toml
    for c in "${CLUSTERS[@]}"; do wait_nodes "$c" "$NODES_UP"; done
    wait_until "both clusters registered with slurmdbd" "$DBD_DIR/slurmdbd.log" clusters_registered
    for c in "${CLUSTERS[@]}"; do check_login_node "$c"; done
    log "dev cluster up: alpha ssh 127.0.0.1:2221, beta ssh 127.0.0.1:2222, broker config $STATE/broker.toml"
}

preflight() {
    ((EUID == 0)) || die "run as root (it starts munge, slurmd and sshd, and creates the user $SVC_USER)"
    # Slurm and sshd configuration files cannot quote paths with whitespace.
    [[ $STATE != *[[:space:]]* ]] || die "the repository path '$REPO' contains whitespace"
    # slurm-wlm-emulator takes over the slurmctld/slurmd alternatives; the real daemons then fail
    # with "No front end nodes defined".
    if [[ -e /usr/sbin/slurmctld && $(readlink -f /usr/sbin/slurmctld) != */slurmctld-wlm ]]; then
        die "/usr/sbin/slurmctld points to $(readlink -f /usr/sbin/slurmctld): remove slurm-wlm-emulator"
    fi
}

make_layout() {
    local c i node
    mkdir -p "$PIDS" "$SSH_DIR" "$DBD_DIR" "$STATE/home"
    for c in "${CLUSTERS[@]}"; do
        mkdir -p "$STATE/$c/state" "$STATE/$c/log" "$STATE/$c/gpus"
        for node in $(cluster_nodes "$c"); do mkdir -p "$STATE/$c/spool/$node"; done
        # Plain empty files stand in for /dev/nvidia*: without File= a node reports 0 GPUs.
        cluster_spec "$c"
        for ((i = 0; i < GPUS_PER_NODE; i++)); do
            [[ -e $STATE/$c/gpus/nvidia$i ]] || : >"$STATE/$c/gpus/nvidia$i"
        done
    done
    chmod 755 "$STATE" "$STATE/home"
    make_traversable "$STATE"
}

# make_traversable DIR: jobs run as $SVC_USER in its home under DIR, and execute their script from
# the spool directory under DIR; a checkout under a mode-700 directory (mktemp -d) would block them.
make_traversable() {
    local d=$1
    while [[ $d != / ]]; do
        if [[ $(stat -c %A "$d") != *[xt] ]]; then
            chmod o+x "$d"
            log "chmod o+x $d (so $SVC_USER can reach .dev-cluster)"
        fi
        d=$(dirname "$d")
    done
}

# write_file PATH MODE < CONTENT: replace PATH only when CONTENT differs, so reruns change nothing.
write_file() {
    local path=$1 mode=$2 tmp
    tmp=$(mktemp "$path.XXXXXX")
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if cmp -s "$tmp" "$path"; then rm -f "$tmp"; else mv -f "$tmp" "$path"; fi
}

# start_munge: reuse any munged that already answers (a system one is left alone and not recorded);
# otherwise start one as the munge user and record its pid.
start_munge() {
    if munge_works; then
        running_pid munged munged >/dev/null || rm -f "$PIDS/munged.pid"
        return 0
    fi
    mkdir -p /run/munge
    chown munge:munge /run/munge
    chmod 755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 600 /etc/munge/munge.key
    fi
    su -s /bin/sh munge -c /usr/sbin/munged 9>&- ||
        die "munged failed to start" /var/log/munge/munged.log
    wait_until "munge -n | unmunge to succeed" /var/log/munge/munged.log munge_works
    # munged can only write its pid file where the munge user may write: keep a copy with ours.
    cp /run/munge/munged.pid "$PIDS/munged.pid"
    log "munged started (pid $(cat "$PIDS/munged.pid"))"
}

# ensure_mariadb: use the MariaDB that answers on the socket; start one only when none runs.
ensure_mariadb() {
    mariadb_answers && return 0
    [[ -x /usr/sbin/mariadbd ]] || die "MariaDB does not answer and mariadb-server is not installed"
    if pidof mariadbd >/dev/null; then
        # Somebody else's server, still starting: wait for it, never start a second one on its data.
        wait_until "the running mariadbd to answer" /var/log/mysql/error.log mariadb_answers
        return 0
    fi
    mkdir -p /run/mysqld "$STATE/mariadb"
    chown mysql:mysql /run/mysqld "$STATE/mariadb"
    if [[ ! -d /var/lib/mysql/mysql ]]; then
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$STATE/mariadb/install-db.log" 2>&1 ||
            die "mariadb-install-db failed" "$STATE/mariadb/install-db.log"
    fi
    start-stop-daemon --start --oknodo --background \
        --make-pidfile --pidfile "$PIDS/mariadbd.pid" --exec /usr/sbin/mariadbd -- \
        --user=mysql --log-error="$STATE/mariadb/mariadbd.log" 9>&-
    wait_until "mariadbd to answer on its socket" "$STATE/mariadb/mariadbd.log" mariadb_answers
    log "mariadbd started (pid $(cat "$PIDS/mariadbd.pid"))"
}

# ensure_accounting_db: database and user for slurmdbd; the password is made once and kept in state.
ensure_accounting_db() {
    local pwfile=$DBD_DIR/db-password
    if [[ ! -s $pwfile ]]; then
        # od reads just what it needs: a tr|head pipeline dies of SIGPIPE under pipefail.
        (umask 077 && od -An -tx1 -N16 /dev/urandom | tr -d ' \n' >"$pwfile")
    fi
    DB_PASSWORD=$(<"$pwfile")
    # ALTER USER on every run: the password in state wins even if the user survived a lost state dir.
    mariadb --protocol=socket -uroot <<SQL || die "could not create the accounting database $DB_NAME"
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASSWORD';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASSWORD';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';
SQL
}

# ensure_service_account: the user the broker logs in as. /bin/sh (dash) reads no rc files for
# commands run over ssh, which keeps every remote command cheap.
ensure_service_account() {
    local home shell
    if ! getent passwd "$SVC_USER" >/dev/null; then
        useradd --system --user-group --shell /bin/sh --home-dir "$SVC_HOME" --no-create-home "$SVC_USER"
        log "created user $SVC_USER"
    fi
    IFS=: read -r _ _ _ _ _ home shell < <(getent passwd "$SVC_USER")
    # The home lives in this checkout's state: point an account made by another checkout here.
    if [[ $home != "$SVC_HOME" || $shell != /bin/sh ]]; then
        usermod --home "$SVC_HOME" --shell /bin/sh "$SVC_USER"
    fi
    # With UsePAM no, sshd refuses an account whose password field starts with '!' (locked), which is
    # how useradd leaves it; '*' means "no password" without locking out key logins.
    if [[ $(getent shadow "$SVC_USER" | cut -d: -f2) == '!'* ]]; then
        usermod -p '*' "$SVC_USER"
    fi
    mkdir -p "$SVC_HOME"
    chown "$SVC_USER:$SVC_USER" "$SVC_HOME"
    chmod 755 "$SVC_HOME"
}

# write_cluster_config CLUSTER: slurm.conf and gres.conf, from cluster_spec.
write_cluster_config() {
    local c=$1 dir=$STATE/$1 host nodeset ports partitions="" p
    host=$(hostname -s)
    cluster_spec "$c"
    nodeset="${NODE_PREFIX}[1-$NODE_COUNT]"
    ports="[$NODE_PORT0-$((NODE_PORT0 + NODE_COUNT - 1))]"
    for p in "${PARTITIONS[@]}"; do
        case $p in
        gpu) partitions+="PartitionName=gpu Nodes=$nodeset Default=YES MaxTime=INFINITE State=UP"$'\n' ;;
        debug) partitions+="PartitionName=debug Nodes=$nodeset MaxTime=30 State=UP"$'\n' ;;
        esac
    done
    write_file "$dir/slurm.conf" 644 <<EOF
# Written by deploy/dev-cluster/up.sh: edit the script, not this file.
ClusterName=$c
# slurmctld checks that its own hostname is the one named here.
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$PIDS/$c-slurmctld.pid
SlurmdPidFile=$PIDS/$c-slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in containers and sandboxes.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, a job that gives no --mem takes a whole node's memory: one job per node.
DefMemPerCPU=4000
# Nodes declare 64 CPUs, 500 GB and GPUs the host does not have.
SlurmdParameters=config_overrides
GresTypes=gpu
SchedulerType=sched/backfill
# Tests want a job to start within a second or two of resources freeing up: no batching delay,
# frequent main and backfill passes (cheap at this size).
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStorageEnforce=associations,limits
AccountingStorageTRES=gres/gpu,gres/gpu:h100,gres/gpu:a100
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Clients retry an unreachable controller for about MessageTimeout seconds before they give up;
# tests that stop slurmctld on purpose should not wait 10 s (the default) per command.
MessageTimeout=5
# A node whose slurmd was restarted comes back by itself.
ReturnToService=2
# scancel and timeouts take seconds, not the default 30 s of grace.
KillWait=5
PropagateResourceLimits=NONE
MailProg=/bin/true
NodeName=$nodeset NodeHostname=$host NodeAddr=127.0.0.1 Port=$ports CPUs=64 RealMemory=512000 Gres=gpu:$GPU_TYPE:$GPUS_PER_NODE State=UNKNOWN
$partitions
EOF
    write_file "$dir/gres.conf" 644 <<EOF
# Written by deploy/dev-cluster/up.sh.
NodeName=$nodeset Name=gpu Type=$GPU_TYPE File=$dir/gpus/nvidia[0-$((GPUS_PER_NODE - 1))]
EOF
}

write_slurmdbd_conf() {
    # slurmdbd insists on mode 600, owned by SlurmUser (root): it holds the database password.
    write_file "$DBD_DIR/slurmdbd.conf" 600 <<EOF
# Written by deploy/dev-cluster/up.sh.
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$PIDS/slurmdbd.pid
LogFile=$DBD_DIR/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=3306
StorageUser=$DB_USER
StoragePass=$DB_PASSWORD
StorageLoc=$DB_NAME
EOF
}

sacctmgr_() { SLURM_CONF=$(cluster_conf alpha) sacctmgr "$@"; }

# sacctmgr_add ARGS...: "sacctmgr -i add", where "Nothing new added" (exit 1) is success.
sacctmgr_add() {
    local out
    out=$(sacctmgr_ -i add "$@" 2>&1) || grep -q 'Nothing new added' <<<"$out" ||
        die "sacctmgr add $* failed: $out" "$DBD_DIR/slurmdbd.log"
}

# register_accounting: the clusters; the account "dev" with root and slurmsvc (for the adapter's
# own tests and the benchmarks); the parent account "broker", of which slurmsvc is coordinator, so
# the broker can create projects' accounts below it and give researchers associations there. slurmsvc
# is no Slurm administrator. Queries first; each add covers every cluster at once, since each
# sacctmgr call costs a few hundred milliseconds.
register_accounting() {
    local c u clusters assocs users coords all_clusters
    all_clusters=$(IFS=,; echo "${CLUSTERS[*]}")
    clusters=$(sacctmgr_ -n -P show cluster format=cluster)
    for c in "${CLUSTERS[@]}"; do
        grep -qx "$c" <<<"$clusters" || { sacctmgr_add cluster "$c" && log "registered cluster $c"; }
    done
    assocs=$(sacctmgr_ -n -P show assoc format=cluster,account,user)
    for c in "${CLUSTERS[@]}"; do
        grep -qx "$c|dev|" <<<"$assocs" || { sacctmgr_add account dev cluster="$all_clusters" \
            description=dev-cluster organization=dev && break; }
    done
    for c in "${CLUSTERS[@]}"; do
        grep -qx "$c|$PARENT_ACCOUNT|" <<<"$assocs" || { sacctmgr_add account "$PARENT_ACCOUNT" \
            cluster="$all_clusters" parent=root description=broker-projects organization=broker && break; }
    done
    for c in "${CLUSTERS[@]}"; do
        for u in "$SVC_USER" root; do
            grep -qx "$c|dev|$u" <<<"$assocs" ||
                { sacctmgr_add user name="$SVC_USER,root" account=dev cluster="$all_clusters" && break 2; }
        done
    done
    users=$(sacctmgr_ -n -P show user format=user,defaultaccount,adminlevel)
    grep -qx "$SVC_USER|dev|None" <<<"$users" ||
        sacctmgr_ -i modify user "$SVC_USER" set defaultaccount=dev adminlevel=None >/dev/null
    grep -qx "root|dev|.*" <<<"$users" || sacctmgr_ -i modify user root set defaultaccount=dev >/dev/null
    coords=$(sacctmgr_ -n -P show account "$PARENT_ACCOUNT" withcoordinator format=account,coordinators)
    grep -q "$SVC_USER" <<<"$coords" ||
        sacctmgr_add coordinator account="$PARENT_ACCOUNT" names="$SVC_USER"
}

# ensure_researchers: the Unix accounts jobs run as (SLURM-NOTES: Debian's useradd makes homes
# 0755; a researcher's home is private). OUTSIDER is a user outside the group, for refusal tests.
ensure_researchers() {
    local u home
    getent group "$RESEARCH_GROUP" >/dev/null || groupadd "$RESEARCH_GROUP"
    for u in "${RESEARCHERS[@]}" "$OUTSIDER"; do
        if ! getent passwd "$u" >/dev/null; then
            useradd --create-home --shell /bin/bash "$u"
            log "created researcher account $u"
        fi
        home=$(getent passwd "$u" | cut -d: -f6)
        chmod 0700 "$home"
    done
    for u in "${RESEARCHERS[@]}"; do
        in_group "$u" || usermod -aG "$RESEARCH_GROUP" "$u"
    done
    if in_group "$OUTSIDER"; then gpasswd -d "$OUTSIDER" "$RESEARCH_GROUP" >/dev/null; fi
    # The service account and root never belong to the group: a member who can become root makes
    # the service account root (SLURM-NOTES, "TRAP").
    for u in "$SVC_USER" root; do
        if in_group "$u"; then die "$u must not be a member of $RESEARCH_GROUP"; fi
    done
}

in_group() { id -nG "$1" | tr ' ' '\n' | grep -qx "$RESEARCH_GROUP"; }

# write_sudoers: the one narrow path from the service account to a researcher (docs/operations.md,
# "Jobs run as the researcher"). Checked with visudo before it is installed.
write_sudoers() {
    local tmp
    tmp=$(mktemp)
    sudoers_rule >"$tmp"
    visudo -cqf "$tmp" || { rm -f "$tmp"; die "the sudoers rule for $SVC_USER does not parse"; }
    chmod 0440 "$tmp"
    if cmp -s "$tmp" "$SUDOERS_FILE"; then rm -f "$tmp"; else mv -f "$tmp" "$SUDOERS_FILE"; fi
}

sudoers_rule() {
    cat <<EOF
# Written by deploy/dev-cluster/up.sh. The broker's service account may run exactly these programs,
# as members of $RESEARCH_GROUP only (never root, never another service account), without a
# password or a tty. SLURM_CONF is the only variable kept; every run is logged to $SUDO_LOG.
Defaults:$SVC_USER env_keep += "SLURM_CONF", umask = 0077, logfile = "$SUDO_LOG", !lecture
Cmnd_Alias BROKER_CMDS = /usr/bin/sbatch, /usr/bin/scancel, /usr/bin/mkdir, /usr/bin/stat, /usr/bin/dd
$SVC_USER ALL = (%$RESEARCH_GROUP, !root, !$SVC_USER) NOPASSWD: BROKER_CMDS
EOF
}

ensure_ssh_keys() {
    local c known=""
    # The service account's key pair, made once; the same key may log in as root (tests do).
    [[ -s $SSH_DIR/id_ed25519 ]] || ssh-keygen -q -t ed25519 -N '' -C "$SVC_USER@dev-cluster" -f "$SSH_DIR/id_ed25519"
    write_file "$SSH_DIR/authorized_keys" 644 <"$SSH_DIR/id_ed25519.pub"
    for c in "${CLUSTERS[@]}"; do
        [[ -s $STATE/$c/ssh_host_ed25519_key ]] ||
            ssh-keygen -q -t ed25519 -N '' -C "$c-login@dev-cluster" -f "$STATE/$c/ssh_host_ed25519_key"
        cluster_spec "$c"
        known+="[127.0.0.1]:$SSH_PORT $(cut -d' ' -f1,2 "$STATE/$c/ssh_host_ed25519_key.pub")"$'\n'
    done
    printf '%s' "$known" | write_file "$SSH_DIR/known_hosts" 644
}

write_sshd_config() {
    local c=$1
    cluster_spec "$c"
    write_file "$STATE/$c/sshd_config" 644 <<EOF
# Written by deploy/dev-cluster/up.sh: the login node of cluster $c.
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $STATE/$c/ssh_host_ed25519_key
PidFile $PIDS/$c-sshd.pid
AuthorizedKeysFile $SSH_DIR/authorized_keys
AllowUsers $SVC_USER root
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
# The keys live in the checkout, whose directories sshd's strict checks would reject.
StrictModes no
# Remote commands reach this cluster's controller.
SetEnv SLURM_CONF=$STATE/$c/slurm.conf
UseDNS no
PrintMotd no
PrintLastLog no
X11Forwarding no
# Tests open many connections at once; the default 10:30:100 drops some of them.
MaxStartups 200
MaxSessions 100
Subsystem sftp internal-sftp
EOF
}

write_broker_toml() {
    local c p out
    out=$(
        cat <<EOF
[server]
host = "127.0.0.1"
port = 8080

[database]
url = "sqlite:///$STATE/broker.db"

[poller]
interval_seconds = 2
EOF
        for c in "${CLUSTERS[@]}"; do
            cluster_spec "$c"
            cat <<EOF

[clusters.$c]
host = "127.0.0.1"
port = $SSH_PORT
user = "$SVC_USER"
private_key = "$SSH_DIR/id_ed25519"
known_hosts = "$SSH_DIR/known_hosts"
slurm_bin_dir = "/usr/bin"
slurm_conf = "$STATE/$c/slurm.conf"
default_partition = "gpu"
manage_accounts = true
parent_account = "$PARENT_ACCOUNT"
output_dir = "/home/{unix_user}/.broker/jobs"
EOF
            for p in "${PARTITIONS[@]}"; do
                printf '\n[clusters.%s.partitions.%s]\ngpu_type = "%s"\n' "$c" "$p" "$GPU_TYPE"
            done
        done
    )
    printf '%s\n' "$out" | write_file "$STATE/broker.toml" 644
}

# clusters_registered: slurmdbd knows every cluster and its controller's address.
clusters_registered() {
    local listed c
    listed=$(sacctmgr_ -n -P show cluster format=cluster,controlhost 2>&1) || return 1
    WAIT_DETAIL=$(tr '\n' ' ' <<<"$listed")
    for c in "${CLUSTERS[@]}"; do grep -qx "$c|127.0.0.1" <<<"$listed" || return 1; done
}

# check_login_node CLUSTER: the round trip the broker makes, with a strict host key check.
check_login_node() {
    local c=$1 out node
    cluster_spec "$c"
    out=$(ssh -F none -i "$SSH_DIR/id_ed25519" -o IdentitiesOnly=yes -o BatchMode=yes -o ConnectTimeout=5 \
        -o UserKnownHostsFile="$SSH_DIR/known_hosts" -o GlobalKnownHostsFile=/dev/null \
        -o StrictHostKeyChecking=yes -p "$SSH_PORT" "$SVC_USER@127.0.0.1" sinfo -h -N -o %N 2>&1) ||
        die "ssh to the login node of $c failed: $out" "$(cluster_log_dir "$c")/sshd.log"
    for node in $(cluster_nodes "$c"); do
        grep -qx "$node" <<<"$out" || die "ssh $SVC_USER@127.0.0.1:$SSH_PORT sinfo does not show node $node of $c: $out"
    done
    log "login node $c: ssh $SVC_USER@127.0.0.1 -p $SSH_PORT sinfo shows $(sort -u <<<"$out" | tr '\n' ' ')"
}

main "$@"
