#!/bin/bash
# Build AIGIS packages from this checkout's working tree (committed or not; .gitignore'd files
# such as .venv/ and examples/.state/ are left out).
#
#   packaging/build.sh deb       Debian package (dpkg-buildpackage, dh + pybuild)  -> dist/
#   packaging/build.sh rpm       RPM (rpmbuild -bb packaging/rpm/aigis.spec)         -> dist/
#   packaging/build.sh lint      lintian on the newest dist/aigis_*.deb
#   packaging/build.sh man       regenerate packaging/man/aigis.1 and aigisctl.1
#   packaging/build.sh version   print the version, its Debian and its RPM spelling
#   packaging/build.sh deps      apt-get install what deb, rpm and lint need (root, Debian)
#
# Environment: OUTDIR (default dist/), BUILDDIR (default build/packaging/; wiped per build),
# PYTHON (for `man`; default .venv/bin/python, else python3).
#
# The version lives only in aigis/_version.py: debian/changelog is generated from
# packaging/deb/changelog.in and the RPM gets --define "aigis_version ...".
set -euo pipefail

TOP=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUTDIR=$(realpath -m "${OUTDIR:-$TOP/dist}")
BUILDDIR=$(realpath -m "${BUILDDIR:-$TOP/build/packaging}")
DEB_BUILD_DEPS="dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all
    python3-setuptools python3-wheel"
RPM_BUILD_DEPS="rpm python3-build python3-installer python3-setuptools python3-wheel"

# Packages are built with the distribution's own python3 and tools, never a venv's or pyenv's.
SYSTEM_PATH=/usr/sbin:/usr/bin:/sbin:/bin
system_env() { env -u PYTHONPATH -u PYTHONHOME -u VIRTUAL_ENV PATH="$SYSTEM_PATH" "$@"; }

die() { echo "build.sh: $*" >&2; exit 1; }

version() {
    local v
    v=$(sed -n 's/^__version__ = "\([^"]*\)"$/\1/p' "$TOP/aigis/_version.py")
    [ -n "$v" ] || die "no __version__ = \"...\" line in $TOP/aigis/_version.py"
    echo "$v"
}

# PEP 440 -> Debian/RPM: pre-releases and dev releases sort before the release with "~"
# (1.0rc1 -> 1.0~rc1, 1.0.dev3 -> 1.0~dev3, 1.0a1.dev2 -> 1.0~a1~dev2; 1.0.post1 stays).
pkg_version() {
    echo "$1" | sed -E -e 's/[.-]?(a|b|rc|alpha|beta|c|pre|preview)([0-9]*)/~\1\2/' \
        -e 's/[.-]?dev([0-9]*)/~dev\1/'
}

# Copy the files git knows about, plus untracked files that are not ignored, to $1.
stage_source() {
    local dest=$1
    rm -rf "$dest"
    mkdir -p "$dest"
    if git -C "$TOP" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        # --cached lists deleted-but-tracked files too: keep only what exists.
        git -C "$TOP" ls-files -z --cached --others --exclude-standard |
            (cd "$TOP" && while IFS= read -r -d '' f; do
                [ -e "$f" ] || [ -L "$f" ] && printf '%s\0' "$f"
            done) |
            tar -C "$TOP" --null --no-recursion -T - -cf - | tar -C "$dest" -xf -
    else
        tar -C "$TOP" --exclude=.git --exclude=.venv --exclude=build --exclude=dist \
            --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache \
            --exclude=.ruff_cache --exclude=examples/.state -cf - . | tar -C "$dest" -xf -
    fi
}

need() {
    local missing=()
    for cmd in "$@"; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
    [ ${#missing[@]} = 0 ] || die "missing ${missing[*]}: run 'packaging/build.sh deps' (as root)"
}

build_deb() {
    need dpkg-buildpackage dh dh_python3
    local v dv src date maint
    v=$(version)
    dv="$(pkg_version "$v")-1"
    src="$BUILDDIR/deb/aigis-$v"
    rm -rf "$BUILDDIR/deb"
    stage_source "$src"
    rm -rf "$src/debian"
    cp -a "$TOP/packaging/deb" "$src/debian"
    rm -f "$src/debian/changelog.in" "$src/debian/README.md"
    maint=$(sed -n 's/^Maintainer: //p' "$src/debian/control")
    # The date of the last commit keeps rebuilds of one commit identical; else now.
    date=$(git -C "$TOP" log -1 --format=%aD 2>/dev/null || true)
    date=$(LC_ALL=C date -R ${date:+-d "$date"})
    sed -e "s/@DEB_VERSION@/$dv/" -e "s/@VERSION@/$v/" -e "s/@MAINTAINER@/$maint/" \
        -e "s/@DATE@/$date/" "$TOP/packaging/deb/changelog.in" > "$src/debian/changelog"
    echo "build.sh: building aigis $dv in $src"
    (cd "$src" && system_env dpkg-buildpackage -us -uc -b)
    mkdir -p "$OUTDIR"
    local f out=()
    for f in "$BUILDDIR"/deb/aigis_"$dv"_*; do
        cp "$f" "$OUTDIR/"
        out+=("$OUTDIR/$(basename "$f")")
    done
    printf 'build.sh: wrote %s\n' "${out[@]}"
}

build_rpm() {
    need rpmbuild
    local v rv top date
    v=$(version)
    rv=$(pkg_version "$v")
    top="$BUILDDIR/rpm"
    rm -rf "$top"
    mkdir -p "$top"/{BUILD,BUILDROOT,RPMS,SOURCES,SPECS,SRPMS}
    stage_source "$top/stage/aigis-$v"
    tar -C "$top/stage" --owner=0 --group=0 --sort=name -czf "$top/SOURCES/aigis-$v.tar.gz" \
        "aigis-$v"
    rm -rf "$top/stage"
    cp "$TOP/packaging/sysusers.d/aigis.conf" "$top/SOURCES/aigis.sysusers"
    cp "$TOP/packaging/rpm/aigis.spec" "$top/SPECS/"
    date=$(git -C "$TOP" log -1 --format=%aD 2>/dev/null || true)
    date=$(LC_ALL=C date +'%a %b %d %Y' ${date:+-d "$date"})
    # Not an RPM-based system (e.g. Debian): BuildRequires cannot be checked against rpmdb.
    local nodeps=()
    rpm -q rpm >/dev/null 2>&1 || nodeps=(--nodeps)
    echo "build.sh: building aigis $rv RPM in $top"
    system_env rpmbuild -bb "${nodeps[@]}" --define "_topdir $top" --define "aigis_version $rv" \
        --define "aigis_source_version $v" --define "aigis_date $date" "$top/SPECS/aigis.spec"
    mkdir -p "$OUTDIR"
    local f
    for f in "$top"/RPMS/*/aigis-*.rpm; do
        cp "$f" "$OUTDIR/"
        echo "build.sh: wrote $OUTDIR/$(basename "$f")"
    done
}

lint_deb() {
    need lintian
    local deb
    deb=$(ls -t "$OUTDIR"/aigis_*.deb 2>/dev/null | head -n1)
    [ -n "$deb" ] || die "no $OUTDIR/aigis_*.deb: run 'packaging/build.sh deb' first"
    # Errors fail; warnings and info are printed (--fail-on error is lintian's default).
    lintian --info --display-info --fail-on error "$deb"
}

gen_man() {
    local py=${PYTHON:-}
    [ -n "$py" ] || { [ -x "$TOP/.venv/bin/python" ] && py=$TOP/.venv/bin/python || py=python3; }
    PYTHONPATH="$TOP${PYTHONPATH:+:$PYTHONPATH}" "$py" "$TOP/packaging/man/genman.py" \
        "$TOP/packaging/man"
}

install_deps() {
    [ "$(id -u)" = 0 ] || die "deps: run as root"
    command -v apt-get >/dev/null || die "deps: needs apt-get (Debian/Ubuntu)"
    apt-get update -q
    # shellcheck disable=SC2086 # word splitting wanted
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        $DEB_BUILD_DEPS $RPM_BUILD_DEPS lintian
}

case "${1:-}" in
deb) build_deb ;;
rpm) build_rpm ;;
lint) lint_deb ;;
man) gen_man ;;
version) v=$(version) && echo "$v $(pkg_version "$v")-1 $(pkg_version "$v")" ;;
deps) install_deps ;;
*) sed -n '2,/^set -e/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
