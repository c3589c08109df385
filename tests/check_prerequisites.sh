#!/usr/bin/env bash
# What `make test` needs beyond Python: Debian's chromium (the site check), npm (MathJax
# for it, offline) and a C++ compiler (torch.compile builds the closed form's opt-in
# kernels, fishr_lite.compiled_variance, in their tests). Checked first, in seconds: as root
# with apt-get they are installed, otherwise the exact command to run is printed and make stops.
set -euo pipefail
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v npm >/dev/null || missing+=(npm)
command -v g++ >/dev/null || missing+=(g++)
python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || {
  echo "make test needs Python >= 3.10 as python3 (found: $(python3 --version 2>&1))" >&2; exit 1; }
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  echo "make test: installing ${missing[*]} from Debian"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
  exit 0
fi
echo "make test needs ${missing[*]} (the site check renders the book in Debian's chromium;" \
     "torch.compile needs g++)." >&2
echo "Install with:  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
echo "or run the other checks alone: make unit notebooks book-strict colab-path" >&2
exit 1
