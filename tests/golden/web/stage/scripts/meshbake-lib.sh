# shellcheck shell=sh
# meshbake-lib.sh: what meshbake's image scripts share. Sourced, never run: it is
# installed beside the scripts (MESHBAKE_LIB in paths.env) and each script sources it
# from its own folder, after setting prog to its name:
#
#   prog=meshbake-example
#   # shellcheck source=meshbake-lib.sh
#   . "${0%/*}/meshbake-lib.sh"
#
# POSIX sh, so that dash and bash scripts share it. It defines functions and sets no
# shell option; each script keeps its own `set` line and its own logic.
#
#   say MESSAGE...     one line "prog: MESSAGE" on stderr
#   die MESSAGE...     say it, then exit 1 (or die_code, when the script sets one)
#   load_env           source MESHBAKE_ENV_FILE when it is set (a manual run or a test;
#                      the units load mesh.env with EnvironmentFile= instead)
#   load_paths         source paths.env, the table of in-image paths (MESHBAKE_PATHS_ENV,
#                      default the image's copy)
#
# An env file is checked before it is sourced: a regular, readable file whose every
# line is blank, a comment, or MESHBAKE_NAME=value with value in the form shlex.quote
# writes (plain characters and '...' quoting). So a planted or damaged file cannot run
# a command or set anything but meshbake's own variables; it is refused with one line
# naming the file and the line.

say() {
    printf '%s: %s\n' "${prog:-meshbake}" "$*" >&2
}

die() {
    say "$*"
    exit "${die_code:-1}"
}

# What render/escape.shell_env_file writes, and nothing else.
_meshbake_env_line="^([[:space:]]*(#.*)?|MESHBAKE_[A-Z0-9_]*=([A-Za-z0-9@%+=:,./_-]|'[^']*'|\"'\")*)\$"

# source_env FILE LABEL: check FILE, then source it; "cannot read LABEL" when it is not
# a readable regular file.
source_env() {
    if [ ! -f "$1" ] || [ ! -r "$1" ]; then
        die "cannot read $2"
    fi
    # grep exits 0 when it found a line that is not an assignment, 1 when every line
    # is one, 2 when it could not read the file. No pipe: under bash's pipefail (which
    # meshbake-firstboot sets) a "head" after it would turn a clean file into an error.
    if _meshbake_bad=$(LC_ALL=C grep -anEv -m 1 -e "$_meshbake_env_line" -- "$1"); then
        die "$1:${_meshbake_bad%%:*}: not a MESHBAKE_NAME=value assignment; refusing to source it"
    elif [ "$?" -ne 1 ]; then
        die "cannot read $2"
    fi
    # shellcheck source=/dev/null
    . "$1"
}

load_env() {
    [ -z "${MESHBAKE_ENV_FILE:-}" ] || source_env "$MESHBAKE_ENV_FILE" "MESHBAKE_ENV_FILE=$MESHBAKE_ENV_FILE"
}

load_paths() {
    paths_env=${MESHBAKE_PATHS_ENV:-/etc/meshbake/paths.env}
    source_env "$paths_env" "$paths_env, the table of in-image paths (set MESHBAKE_PATHS_ENV)"
}
