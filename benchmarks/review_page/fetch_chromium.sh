#!/bin/sh
# Fetch Debian's chromium-headless-shell and the libraries it lacks, unpacked without installing
# (`apt-get download` + `dpkg -x`), for the review page's browser tests.
#
#   benchmarks/review_page/fetch_chromium.sh [DEST]      # default: ~/.cache/weight_mapper/chromium
#
# The tests find it there (or set WM_CHROMIUM_DIR=DEST) and set LD_LIBRARY_PATH themselves.
# Needs apt's package lists (`apt-get update` once). The library list is Debian 12's (bookworm);
# on another release, the script names the libraries still missing: add their packages.
set -eu
DEST=${1:-${WM_CHROMIUM_DIR:-$HOME/.cache/weight_mapper/chromium}}
mkdir -p "$DEST/debs"
cd "$DEST/debs"
apt-get download chromium-headless-shell chromium-common \
    libopenh264-7 libdouble-conversion3 libopus0 libharfbuzz-subset0 libxnvctrl0 libpulse0 libflac12 \
    libminizip1 libopenjp2-7 libogg0 libsndfile1 libasyncns0 libvorbis0a libvorbisenc2 libmpg123-0 libmp3lame0
for deb in *.deb; do dpkg -x "$deb" "$DEST/root"; done
SHELL_BIN="$DEST/root/usr/lib/chromium/chromium-headless-shell"
LIBS="$DEST/root/usr/lib/x86_64-linux-gnu:$DEST/root/usr/lib/x86_64-linux-gnu/pulseaudio:$DEST/root/usr/lib/chromium"
missing=$(LD_LIBRARY_PATH="$LIBS" ldd "$SHELL_BIN" | awk '/not found/ {print $1}')
if [ -n "$missing" ]; then
    echo "still missing (download their packages with apt-get download, unpack with dpkg -x into $DEST/root):" $missing >&2
    exit 1
fi
LD_LIBRARY_PATH="$LIBS" "$SHELL_BIN" --version
echo "chromium-headless-shell unpacked in $DEST"
