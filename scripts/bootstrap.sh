# Sourced by ./tandem and ./test: makes sure .venv exists and holds this checkout's dependencies.
# The stamp holds pyproject.toml's hash and every extra installed so far ("<hash> dev,gpu"): a run asking
# for extras already there installs nothing, so ./tandem and ./test can alternate without reinstalling.
tandem_bootstrap() {
  local root=$1 extras=$2
  local venv=$root/.venv
  local stamp=$venv/.tandem-installed
  local hash have_hash="" have_extras="" want missing=""
  hash="$(sha256sum "$root/pyproject.toml" | cut -c1-16)"
  if [ ! -x "$venv/bin/python" ]; then
    echo "tandem: creating $venv (first run)" >&2
    python3 -m venv "$venv"
  fi
  [ -f "$stamp" ] && read -r have_hash have_extras <"$stamp"
  case $have_hash in *-*) have_extras=${have_hash#*-} have_hash=${have_hash%%-*} ;; esac  # the old "<hash>-<extras>"
  local e
  for e in ${extras//,/ }; do
    case ",$have_extras," in *",$e,"*) ;; *) missing="$missing,$e" ;; esac
  done
  if [ "$have_hash" = "$hash" ] && [ -z "$missing" ]; then
    return 0
  fi
  # Keep what was installed before (a changed pyproject.toml reinstalls it too), add what is asked for.
  want="$(echo "$have_extras$missing" | tr ',' '\n' | sed '/^$/d' | sort -u | paste -sd, -)"
  echo "tandem: installing dependencies into $venv (first run: a few minutes, about 6 GB)" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  local spec="$root"
  [ -n "$want" ] && spec="$root[$want]"
  "$venv/bin/python" -m pip install -q -e "$spec" >&2
  echo "$hash $want" >"$stamp"
  echo "tandem: installed; starting (the first start also compiles Python's caches: up to a minute)" >&2
}
