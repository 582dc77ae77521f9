#!/usr/bin/env bash
# Fetch the pinned sources (npm + Debian packages) into $DATA and build the image folder.
# Re-running is cheap: installed packages, extracted .debs and written images are kept.
# Usage: examples/emoji/build.sh [extra build_dataset.py options]
set -euo pipefail

DATA=${DATA:-data}  # relative to where it runs; the repository ignores /data/
mkdir -p "$DATA" && DATA=$(cd "$DATA" && pwd)  # absolute: node and apt-get run elsewhere
PYTHON=${PYTHON:-python3}  # the active environment, where inpaint is installed
HERE=$(cd "$(dirname "$0")" && pwd)

NPM_PACKAGES=(
  emoji-datasource-google@16.0.0
  @lobehub/fluent-emoji-3d@1.1.0
  fluentui-emoji@1.3.0
)
# Debian bookworm versions.
DEB_PACKAGES=(
  dataset-fashion-mnist=0.0~git20200523.55506a9-1
  plasma-workspace-wallpapers=4:5.27.5-2
  mate-backgrounds=1.26.0-1
  lomiri-wallpapers-16.04=20.04.0-2
)
PIP_PACKAGES=(resvg-py==0.5.0 emoji==2.16.0)

"$PYTHON" -c "import resvg_py, emoji" 2>/dev/null || "$PYTHON" -m pip install "${PIP_PACKAGES[@]}"

mkdir -p "$DATA/npm"
for spec in "${NPM_PACKAGES[@]}"; do
  name=${spec%@*}
  version=${spec##*@}
  installed=$(node -p "require('$DATA/npm/node_modules/$name/package.json').version" 2>/dev/null || true)
  if [[ "$installed" != "$version" ]]; then
    npm install --prefix "$DATA/npm" --no-audit --no-fund --ignore-scripts --save-exact "$spec"
  fi
done

mkdir -p "$DATA/deb"
for spec in "${DEB_PACKAGES[@]}"; do
  name=${spec%%=*}
  if [[ ! -f "$DATA/deb/$name/DEBIAN/control" ]]; then
    (cd "$DATA/deb" && apt-get download "$spec")
    deb=$(ls "$DATA/deb/${name}"_*.deb | head -n 1)
    dpkg-deb -x "$deb" "$DATA/deb/$name"
    dpkg-deb -e "$deb" "$DATA/deb/$name/DEBIAN"
  fi
done

exec "$PYTHON" "$HERE/build_dataset.py" --npm "$DATA/npm/node_modules" --deb "$DATA/deb" \
  --out "$DATA/emoji_src" "$@"
