# Sourced by ./tandem and ./test: makes sure .venv exists and holds this checkout's dependencies.
# A stamp of pyproject.toml's hash and the extras asked for keeps the install to the first run.
tandem_bootstrap() {
  local root=$1 extras=$2
  local venv=$root/.venv
  local want
  want="$(sha256sum "$root/pyproject.toml" | cut -c1-16)-$extras"
  if [ ! -x "$venv/bin/python" ]; then
    echo "tandem: creating $venv (first run)" >&2
    python3 -m venv "$venv"
  fi
  if [ "$(cat "$venv/.tandem-installed" 2>/dev/null)" != "$want" ]; then
    echo "tandem: installing dependencies into $venv (first run: a few minutes, about 6 GB)" >&2
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
    local spec="$root"
    [ -n "$extras" ] && spec="$root[$extras]"
    "$venv/bin/python" -m pip install -q -e "$spec" >&2
    echo "$want" >"$venv/.tandem-installed"
  fi
}
