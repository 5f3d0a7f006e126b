# shellcheck shell=bash
# Cached builds keyed by their inputs, shared by scripts/build-kernel,
# scripts/build-initramfs and scripts/make-fixtures (sourced, not run).
#
# An entry is the directory CACHE/KEY. It is built in a temp dir beside it
# (CACHE/.tmp-KEY.XXXXXX) and published by rename while CACHE/.lock-KEY is flocked, so
# concurrent callers build it once, and a killed build leaves nothing half-visible: the
# next build of that key removes its temp dir.

# Prints 16 hex digits of the sha256 of stdin: the key of what was written there.
cache_hash() { sha256sum | cut -c1-16; }

# cache_entry CACHE KEY BUILDER [ARGS...]: prints CACHE/KEY, first running
# `BUILDER DIR ARGS...` (its stdout to stderr) into a new temp dir DIR and renaming DIR to
# CACHE/KEY when that does not exist yet. An entry found is touched, so that cache_prune
# keeps it. Call it as `entry=$(cache_entry ...)`, never as a condition (`if`, `||`), where
# bash would ignore a failing command of BUILDER and publish what it left.
cache_entry() (
	set -euo pipefail
	shopt -s inherit_errexit
	local cache=$1 key=$2 builder=$3 entry tmp lock
	shift 3
	entry=$cache/$key
	mkdir -p "$cache"
	exec {lock}>"$cache/.lock-$key"
	flock "$lock"
	if [ -d "$entry" ]; then
		touch "$entry"
	else
		# Holding the lock, any temp dir of this key is a killed build's.
		for tmp in "$cache/.tmp-$key".*; do
			if [ -e "$tmp" ]; then cache_remove_tree "$tmp"; fi
		done
		tmp=$(mktemp -d "$cache/.tmp-$key.XXXXXX")
		# This function runs in a subshell of its own, so the trap is its own too.
		trap 'if [ -e "$tmp" ]; then cache_remove_tree "$tmp"; fi' EXIT
		echo "cache: building $entry (in $tmp)" >&2
		"$builder" "$tmp" "$@" >&2
		chmod 0755 "$tmp"
		mv -T "$tmp" "$entry"
		echo "cache: published $entry" >&2
	fi
	echo "$entry"
)

# cache_prune CACHE DAYS KEY...: removes the entries of CACHE that no run has used for DAYS
# days (a changed input leaves its old key behind), except KEY... (touched instead) and
# entries another run holds locked.
cache_prune() {
	local cache=$1 days=$2 entry key lock
	shift 2
	for entry in "$cache"/*; do
		[ -d "$entry" ] || continue
		key=${entry##*/}
		if [[ " $* " == *" $key "* ]]; then
			touch "$entry"
			continue
		fi
		exec {lock}>"$cache/.lock-$key"
		if flock -n "$lock" && [ -n "$(find "$entry" -maxdepth 0 -mtime "+$days")" ]; then
			cache_remove_tree "$entry"
			echo "pruned $entry (unused for $days days)" >&2
		fi
		exec {lock}>&-
	done
}

# Removes DIR after unmounting whatever a killed build left mounted below it (debootstrap
# mounts proc and sys), never crossing into another filesystem.
cache_remove_tree() { # DIR
	local mount
	while read -r mount; do
		umount -l "$mount" || true
	done < <(mounts_below "$1" | sort -r)
	rm -rf --one-file-system "$1"
}

mounts_below() { # DIR: prints the mount points below DIR
	local dir mount
	dir=$(readlink -f "$1")
	while read -r mount; do
		if [[ $mount == "$dir"/* ]]; then
			echo "$mount"
		fi
	done < <(findmnt -rn -o TARGET)
}
