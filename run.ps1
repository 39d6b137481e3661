# chronicle developer tasks for Windows PowerShell 5.1 and PowerShell 7 (Windows, Linux, macOS).
# run.sh is the line-by-line bash mirror: same verbs, same order, same messages.
# Usage: .\run.ps1 <verb> [args...]     (.\run.ps1 help lists the verbs)
# No param() block: every argument, -h and --help included, arrives as it is in $args
# (declared parameters would make PowerShell take -h and the like for itself).
$ErrorActionPreference = 'Stop'
$Verb = if ($args.Count -gt 0) { [string]$args[0] } else { 'help' }
$Rest = @($args | Select-Object -Skip 1 | Where-Object { $null -ne $_ } | ForEach-Object { [string]$_ })

$Root = $PSScriptRoot
$OnWindows = ($PSVersionTable.PSEdition -eq 'Desktop') -or ($IsWindows -eq $true)
$ExeSuffix = if ($OnWindows) { '.exe' } else { '' }
$IsRoot = (-not $OnWindows) -and ((& id -u) -eq '0')

# The runbook's devtest database (section 6.2): port 5435, user/password wordloom, database wordloom_test.
$DevDbPort = 5435
$DevDbName = 'wordloom_test'
$DevDbUser = 'wordloom'
$DevDbPassword = 'wordloom'
$DevDatabaseUrl = "postgresql+psycopg://${DevDbUser}:${DevDbPassword}@localhost:${DevDbPort}/${DevDbName}"
# The demo's own database on 127.0.0.1:5432 (CHRONICLE_DEMO_DB picks another name).
$DemoDbName = if ($env:CHRONICLE_DEMO_DB) { $env:CHRONICLE_DEMO_DB } else { 'chronicle_demo' }
$DemoDatabaseUrl = "postgres://postgres@127.0.0.1:5432/$DemoDbName"
# The runbook's Docker container (docker-compose name): reused when Docker has it, else created.
$DockerName = 'wordloom-devtest-db_devtest-1'
$TargetDir = if ($env:CARGO_TARGET_DIR) { $env:CARGO_TARGET_DIR } else { 'target' }
# CHRONICLE_BIN=path: use that binary, build nothing (relative paths start at the repository).
$Bin = if ($env:CHRONICLE_BIN) { $env:CHRONICLE_BIN } else { Join-Path (Join-Path $TargetDir 'release') "chronicle$ExeSuffix" }
if (-not [IO.Path]::IsPathRooted($Bin)) { $Bin = Join-Path '.' $Bin }

function Show-Usage {
  Write-Host @'
usage: .\run.ps1 <verb> [args...]

verbs:
  help       show this list (also -h, --help)
  build      cargo build --release
  test       cargo test [args...]: unit, integration and doc tests (the tests find or start a PostgreSQL themselves)
  check-all  the external checks: promtool + Prometheus tests (installed if missing), chronicle.exe under Wine, the container image
             (alert rules, dashboard, a live scrape by a real Prometheus; see monitoring/README.md)
  migrate    build, then chronicle migrate [args...] on DATABASE_URL (unset: the dev database)
  worker     build, then chronicle worker [args...] with the runbook's OUTBOX_* values as defaults
  db-start   start the dev PostgreSQL: 127.0.0.1:5435, user/password wordloom, database wordloom_test
  db-stop    stop the dev PostgreSQL (its data stays; db-destroy removes it)
  db-destroy stop the dev PostgreSQL and delete its data folder for good (--yes to confirm; a Docker
             container is left to docker rm)
  demo       migrate, inject 5000 events into its database, run the worker for 5 s, show the results
             (DATABASE_URL, else database chronicle_demo on 127.0.0.1:5432, else the dev database)
  smoke      the runbook's smoke run: dev database, migrate, worker for 2 s, the acceptance queries;
             exits 1 when anything is off (see docs/operations.md). When nothing is pending it injects
             100 synthetic events: into a DATABASE_URL other than the dev database only with --yes
  monitoring a local Prometheus with monitoring/alerts.yml scraping the local worker, in the foreground
             (PROMETHEUS_PORT, default 9090 or the next free port; OUTBOX_METRICS_PORT, default 9110)

environment:
  DATABASE_URL    the database of migrate, worker, demo and smoke (then no dev database is started)
  CHRONICLE_BIN   a chronicle binary to use instead of building target\release\chronicle.exe
  CHRONICLE_DEMO_DB     the demo's database name on 127.0.0.1:5432 (default chronicle_demo)
  CHRONICLE_SMOKE_WRITE 1: as smoke --yes (for CI, which has no one to ask)

PowerShell keeps a bare -- for itself: quote it, e.g. .\run.ps1 test '--' --nocapture
'@
}

# ---------------------------------------------------------------- helpers

function Die([string]$Message) {
  [Console]::Error.WriteLine("error: $Message")
  exit 1
}

# Environment changes would outlive the script in this PowerShell session (bash runs in a child
# process): remember every variable we set and put it back at the end.
$SavedEnv = @{}
function Set-Env([string]$Name, $Value) {
  if (-not $SavedEnv.ContainsKey($Name)) { $SavedEnv[$Name] = [Environment]::GetEnvironmentVariable($Name) }
  [Environment]::SetEnvironmentVariable($Name, $Value)
}
function Restore-Env {
  foreach ($k in @($SavedEnv.Keys)) { [Environment]::SetEnvironmentVariable($k, $SavedEnv[$k]) }
}

# Hide the password of any URL in what we print: scheme://user:***@host
function Hide-Password([string]$Text) { return ($Text -replace '(://[^:/@]*:)[^@/]*@', '$1***@') }

# Print a command as one could paste it: plain words bare, anything else in single quotes.
function Show-Command([string]$Exe, [string[]]$Arguments) {
  $words = foreach ($a in @($Exe) + @($Arguments)) {
    if ($a -match '^[A-Za-z0-9_./:=@+,%\\-]+$') { $a } else { "'" + ($a -replace "'", "''") + "'" }
  }
  Write-Host ('==> ' + (Hide-Password ($words -join ' ')))
}

function Test-Command([string]$Exe) {
  return [bool](Get-Command $Exe -CommandType Application -ErrorAction SilentlyContinue)
}

# Native commands run with ErrorActionPreference 'Continue' (Windows PowerShell turns their stderr
# into errors when it is redirected); their exit code decides, as in bash.

# Print a command, then run it; stop the script with its exit code if it fails.
function Step([string]$Exe, [string[]]$Arguments = @()) {
  $Arguments = @($Arguments | Where-Object { $null -ne $_ })
  Show-Command $Exe $Arguments
  if (-not (Test-Command $Exe)) { Die "command not found: $Exe" }
  $ErrorActionPreference = 'Continue'
  & $Exe @Arguments | Out-Host
  if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }
}

# Run a command without output; only its exit status counts.
function Test-Quiet([string]$Exe, [string[]]$Arguments = @()) {
  if (-not (Test-Command $Exe)) { return $false }
  $ErrorActionPreference = 'Continue'
  & $Exe @Arguments *> $null
  return ($LASTEXITCODE -eq 0)
}

# A command's standard output, trimmed; like bash's $(...) under set -e it stops the script on
# failure, unless -Optional (then $null).
function Get-Output([string]$Exe, [string[]]$Arguments = @(), [switch]$Optional) {
  if (-not (Test-Command $Exe)) { if ($Optional) { return $null }; Die "command not found: $Exe" }
  $ErrorActionPreference = 'Continue'
  $out = & $Exe @Arguments
  if ($LASTEXITCODE -ne 0) { if ($Optional) { return $null }; exit $LASTEXITCODE }
  return (($out | Out-String).Trim())
}

# SQLAlchemy URLs (postgresql+psycopg://...) -> libpq URLs that psql understands.
function ConvertTo-LibpqUrl([string]$Url) { return ($Url -replace '^postgresql\+[A-Za-z0-9_]+://', 'postgresql://') }

# Does anything listen on host:port?
function Test-TcpOpen([string]$HostName, [int]$Port) {
  $client = New-Object System.Net.Sockets.TcpClient
  try { return $client.ConnectAsync($HostName, $Port).Wait(2000) } catch { return $false } finally { $client.Close() }
}

# Does a PostgreSQL accept connections on host:port?
function Test-PgReady([string]$HostName, [int]$Port) {
  if (Get-Command pg_isready -ErrorAction SilentlyContinue) {
    return (Test-Quiet 'pg_isready' @('-q', '-h', $HostName, '-p', "$Port"))
  }
  return (Test-TcpOpen $HostName $Port)
}

function Test-PgBinDir([string]$Dir) {
  return ($Dir -and (Test-Path (Join-Path $Dir "initdb$ExeSuffix")) -and (Test-Path (Join-Path $Dir "pg_ctl$ExeSuffix")))
}

# Directory holding initdb and pg_ctl: the version matching an existing cluster ($Want),
# else pg_config --bindir, else the newest installed version, else PATH.
function Find-PgBinDir([string]$Want = '') {
  $roots = @('/usr/lib/postgresql')
  if ($env:ProgramFiles) { $roots += (Join-Path $env:ProgramFiles 'PostgreSQL') }
  if ($Want) {
    foreach ($r in $roots) { $d = Join-Path (Join-Path $r $Want) 'bin'; if (Test-PgBinDir $d) { return $d } }
  }
  if (Get-Command pg_config -ErrorAction SilentlyContinue) {
    $d = Get-Output 'pg_config' @('--bindir') -Optional
    if (Test-PgBinDir $d) { return $d }
  }
  $cands = foreach ($r in $roots) { Get-Item -Path (Join-Path (Join-Path $r '*') 'bin') -ErrorAction SilentlyContinue }
  $newest = @($cands | Where-Object { Test-PgBinDir $_.FullName } |
    Sort-Object { [double]($_.Parent.Name -replace '[^0-9.].*$', '') + 0 }) | Select-Object -Last 1
  if ($newest) { return $newest.FullName }
  $pgctl = Get-Command "pg_ctl$ExeSuffix" -CommandType Application -ErrorAction SilentlyContinue | Select-Object -First 1
  if ($pgctl -and (Get-Command "initdb$ExeSuffix" -CommandType Application -ErrorAction SilentlyContinue)) {
    return (Split-Path -Parent $pgctl.Path)
  }
  return $null
}

# psql from PATH, else from the server binaries.
function Find-Psql {
  $p = Get-Command "psql$ExeSuffix" -CommandType Application -ErrorAction SilentlyContinue | Select-Object -First 1
  if ($p) { return $p.Path }
  $d = Find-PgBinDir
  if ($d -and (Test-Path (Join-Path $d "psql$ExeSuffix"))) { return (Join-Path $d "psql$ExeSuffix") }
  return $null
}

# initdb refuses to run as root: then the cluster belongs to the postgres OS user,
# in a folder it can reach (one per checkout, the same one run.sh uses), instead of .devdb in the repository.
function Get-DevDbDir {
  if ($IsRoot) {
    $sum = Get-Output 'sh' @('-c', 'set -f; IFS=; printf %s $1 | cksum', 'sh', $Root)
    return ('/tmp/chronicle-devdb-' + $sum.Split(' ')[0])
  }
  return (Join-Path $Root '.devdb')
}

# Run a server command as the cluster's owner (the postgres OS user when we are root).
function Step-AsOwner([string]$Exe, [string[]]$Arguments = @()) {
  if (-not $IsRoot) { Step $Exe $Arguments; return }
  Push-Location '/'
  try { Step 'runuser' (@('-u', 'postgres', '--', $Exe) + $Arguments) } finally { Pop-Location }
}
function Test-QuietAsOwner([string]$Exe, [string[]]$Arguments = @()) {
  if (-not $IsRoot) { return (Test-Quiet $Exe $Arguments) }
  Push-Location '/'
  try { return (Test-Quiet 'runuser' (@('-u', 'postgres', '--', $Exe) + $Arguments)) } finally { Pop-Location }
}

# pg_ctl start leaves a server running that inherits pg_ctl's handles: started through a pipe
# (as Step does), PowerShell would wait for that server to exit. Start it on the console instead.
function Start-AsOwner([string]$Exe, [string[]]$Arguments = @()) {
  if ($IsRoot) { $Arguments = @('-u', 'postgres', '--', $Exe) + $Arguments; $Exe = 'runuser' }
  Show-Command $Exe $Arguments
  $quoted = foreach ($a in $Arguments) { if ($a -match '[\s"]') { '"' + ($a -replace '"', '\"') + '"' } else { $a } }
  $wd = if ($IsRoot) { '/' } else { $Root }
  $p = Start-Process -FilePath $Exe -ArgumentList ($quoted -join ' ') -NoNewWindow -PassThru -WorkingDirectory $wd
  $null = $p.Handle  # keeps ExitCode readable after the exit (Windows PowerShell quirk)
  $p.WaitForExit()
  return ($p.ExitCode -eq 0)
}

# cargo build --release, unless CHRONICLE_BIN names the binary to use.
function Build-Release {
  if ($env:CHRONICLE_BIN) {
    if (-not (Test-Path -PathType Leaf $Bin)) { Die "CHRONICLE_BIN=$Bin is not a file" }
    Write-Host "    CHRONICLE_BIN=${Bin}: using it, not building"
    return
  }
  Step 'cargo' @('build', '--release')
}

# DATABASE_URL from the environment, else the dev database (.\run.ps1 db-start).
function Use-DatabaseUrl {
  if ($env:DATABASE_URL) {
    Write-Host ('    DATABASE_URL from the environment: ' + (Hide-Password $env:DATABASE_URL))
  } else {
    Set-Env 'DATABASE_URL' $DevDatabaseUrl
    Write-Host "    DATABASE_URL is not set; using the dev database (.\run.ps1 db-start): $DevDatabaseUrl"
  }
}

# The runbook's worker variables; each one is set only when not already set.
# $MetricsPort: the metrics port default (9110; the demo uses 0 to avoid port clashes).
function Set-WorkerDefaults([string]$MetricsPort) {
  $defaults = [ordered]@{
    OUTBOX_WORKER_ID                = 'c1'
    OUTBOX_METRICS_PORT             = $MetricsPort
    OUTBOX_BATCH_SIZE               = '50'
    OUTBOX_POLL_INTERVAL_SECONDS    = '0.2'
    OUTBOX_LEASE_SECONDS            = '30'
    OUTBOX_MAX_ATTEMPTS             = '10'
    OUTBOX_BASE_BACKOFF_SECONDS     = '0.5'
    OUTBOX_MAX_BACKOFF_SECONDS      = '30'
    OUTBOX_RECLAIM_INTERVAL_SECONDS = '5'
    OUTBOX_MAX_PROCESSING_SECONDS   = '600'
  }
  foreach ($k in @($defaults.Keys)) {
    if (-not [Environment]::GetEnvironmentVariable($k)) { Set-Env $k $defaults[$k] }
  }
  $line = '   '
  foreach ($k in @($defaults.Keys) + @('OUTBOX_RUN_SECONDS')) {
    $v = [Environment]::GetEnvironmentVariable($k)
    if ($v) { $line += " $k=$v" }
  }
  Write-Host $line
}

# ---------------------------------------------------------------- verbs

function Verb-Build([string[]]$Arguments) { Step 'cargo' (@('build', '--release') + $Arguments) }

# The library, the binary, the integration tests and the doc tests. Not the benchmark (benches/: a
# program that runs for minutes, `cargo bench`) nor tests/external (`check-all`).
function Verb-Test([string[]]$Arguments) { Step 'cargo' (@('test') + $Arguments) }

# Print a command, then run it; $true when it succeeded (bash: step ... || die ...).
function Test-Step([string]$Exe, [string[]]$Arguments = @()) {
  Show-Command $Exe $Arguments
  if (-not (Test-Command $Exe)) { return $false }
  $ErrorActionPreference = 'Continue'
  & $Exe @Arguments | Out-Host
  return ($LASTEXITCODE -eq 0)
}

# promtool and prometheus on PATH: installed from the Debian package prometheus when missing
# (it gives both), else the run fails saying what to install.
function Assert-Prometheus {
  $missing = @()
  foreach ($tool in @('promtool', 'prometheus')) {
    $found = Get-Command $tool -CommandType Application -ErrorAction SilentlyContinue | Select-Object -First 1
    if ($found) { Write-Host "    ${tool}: $($found.Path)" } else { $missing += $tool }
  }
  if ($missing.Count -gt 0) {
    Write-Host "    missing: $($missing -join ' '); installing the Debian package prometheus (it gives promtool and prometheus)"
    if (-not (Test-Command 'apt-get')) {
      Die "$($missing -join ' ') not installed and no apt-get here: install Prometheus (https://prometheus.io/download/) so that promtool and prometheus are on PATH"
    }
    $exe = 'env'
    $pre = @('DEBIAN_FRONTEND=noninteractive')
    if (-not $IsRoot) {
      if (-not (Test-Command 'sudo')) { Die 'installing prometheus needs root or sudo: run as root, or install it yourself (apt-get install prometheus)' }
      $exe = 'sudo'
      $pre = @('env', 'DEBIAN_FRONTEND=noninteractive')
    }
    if (-not (Test-Step $exe ($pre + @('apt-get', 'update')))) {
      Die 'apt-get update failed; install prometheus yourself (apt-get install prometheus)'
    }
    if (-not (Test-Step $exe ($pre + @('apt-get', 'install', '-y', '--no-install-recommends', 'prometheus')))) {
      Die 'apt-get install prometheus failed; install it yourself (https://prometheus.io/download/)'
    }
    foreach ($tool in @('promtool', 'prometheus')) {
      if (-not (Test-Command $tool)) { Die "$tool is still missing after installing the package prometheus" }
    }
  }
}

# The checks that need promtool and prometheus (tests/external.rs).
function Verb-CheckAll([string[]]$Arguments) {
  Assert-Prometheus
  Step 'cargo' (@('test', '--test', 'external') + $Arguments)
  # Packaging, for real: chronicle.exe under Wine, and the container image (Linux
  # tools; on Windows the exe runs natively and the image is built with podman/docker).
  if ($IsLinux) {
    Step 'bash' @('packaging/check-run-ps1.sh')
    Step 'bash' @('packaging/check-wine.sh')
    Step 'bash' @('packaging/check-container.sh')
  } else {
    Write-Host '    the Wine and container checks run on Linux (packaging/check-wine.sh, packaging/check-container.sh)'
  }
}

function Verb-Migrate([string[]]$Arguments) {
  Build-Release
  Use-DatabaseUrl
  Step $Bin (@('migrate') + $Arguments)
}

function Verb-Worker([string[]]$Arguments) {
  Build-Release
  Use-DatabaseUrl
  Set-WorkerDefaults '9110'
  Step $Bin (@('worker') + $Arguments)
}

# Docker available and running: the runbook's devtest container.
function Test-Docker {
  return ((Get-Command docker -ErrorAction SilentlyContinue) -and (Test-Quiet 'docker' @('info')))
}
function Get-DockerState {
  return (Get-Output 'docker' @('ps', '-a', '--filter', ('name=^' + $DockerName + '$'), '--format', '{{.State}}') -Optional)
}

# Does the devtest database on 127.0.0.1:5435 accept the runbook's user and password?
# Without psql nobody can ask: then yes, and `chronicle migrate` will say if it is not.
function Test-DevDbAnswers {
  $psql = Find-Psql
  if (-not $psql) {
    Write-Host "    psql is not installed to check who answers on 127.0.0.1:$DevDbPort; assuming the runbook's database"
    return $true
  }
  Set-Env 'PGPASSWORD' $DevDbPassword
  return (Test-Quiet $psql @('-X', '-w', '-h', '127.0.0.1', '-p', "$DevDbPort", '-U', $DevDbUser, '-d', $DevDbName, '-c', 'select 1'))
}

# Something listens on 127.0.0.1:5435: use it when it is the runbook's database, else stop.
function Use-DevDbOnPort {
  if (-not (Test-DevDbAnswers)) {
    Die "port $DevDbPort on 127.0.0.1 is taken by a server that refuses wordloom/wordloom on ${DevDbName}; stop it first"
  }
  Write-Host "a devtest database already answers on 127.0.0.1:$DevDbPort (not started by run.ps1); using it"
  Write-Host "DATABASE_URL=$DevDatabaseUrl"
}

function Start-DockerDb {
  Write-Host "    docker is available: using the runbook's container $DockerName"
  $state = Get-DockerState
  if ($state -eq 'running') {
    Write-Host "dev database already running (docker container $DockerName)"
    Write-Host "DATABASE_URL=$DevDatabaseUrl"
    return
  }
  if ($state -and (Test-TcpOpen '127.0.0.1' $DevDbPort)) {
    Write-Host "    port $DevDbPort is held by another server; not starting the container"
    Use-DevDbOnPort
    return
  }
  if ($state) {
    Step 'docker' @('start', $DockerName)
  } else {
    if (Test-TcpOpen '127.0.0.1' $DevDbPort) { Use-DevDbOnPort; return }
    Step 'docker' @('run', '-d', '--name', $DockerName, '-e', "POSTGRES_USER=$DevDbUser", '-e', "POSTGRES_PASSWORD=$DevDbPassword",
      '-e', "POSTGRES_DB=$DevDbName", '-p', "${DevDbPort}:5432", 'postgres:15')
  }
  Write-Host '==> waiting for the container to accept connections'
  # Over TCP inside the container: the image's first-start initialisation listens on the socket only.
  $ready = $false
  for ($i = 0; $i -lt 60 -and -not $ready; $i++) {
    $ready = Test-Quiet 'docker' @('exec', $DockerName, 'pg_isready', '-q', '-h', '127.0.0.1', '-p', '5432', '-U', $DevDbUser, '-d', $DevDbName)
    if (-not $ready) { Start-Sleep -Seconds 1 }
  }
  if (-not $ready) {
    Step 'docker' @('logs', '--tail', '20', $DockerName)
    Die "the dev database did not start (docker logs $DockerName)"
  }
  Write-Host "dev database running (docker container $DockerName)"
  Write-Host "DATABASE_URL=$DevDatabaseUrl"
  Write-Host "    `$env:DATABASE_URL='$DevDatabaseUrl'"
}

function Verb-DbStart {
  if (Test-Docker) { Start-DockerDb; return }
  $devdb = Get-DevDbDir
  $data = Join-Path $devdb 'data'
  $log = Join-Path $devdb 'postgres.log'
  $version = ''
  if (Test-Path (Join-Path $data 'PG_VERSION')) { $version = (Get-Content (Join-Path $data 'PG_VERSION') -TotalCount 1).Trim() }
  $bindir = Find-PgBinDir $version
  if ($version -and $bindir -and (Test-QuietAsOwner (Join-Path $bindir "pg_ctl$ExeSuffix") @('status', '-D', $data))) {
    Write-Host "dev database already running (data: $data)"
    Write-Host "DATABASE_URL=$DevDatabaseUrl"
    return
  }
  if (Test-TcpOpen '127.0.0.1' $DevDbPort) { Use-DevDbOnPort; return }
  if (-not $bindir) { Die 'no PostgreSQL server binaries (initdb, pg_ctl) found; install PostgreSQL server binaries (https://www.postgresql.org/download/), or Docker' }
  Write-Host "    PostgreSQL server binaries: $bindir"
  $pgctl = Join-Path $bindir "pg_ctl$ExeSuffix"
  $psql = Join-Path $bindir "psql$ExeSuffix"
  Set-Env 'PGPASSWORD' $DevDbPassword
  if ($IsRoot) {
    if (-not (Test-Quiet 'id' @('postgres'))) { Die "running as root: initdb refuses root and there is no 'postgres' OS user; run as a normal user" }
    if ((Test-Path $devdb) -and (Get-Item $devdb -Force).LinkType) { Die "$devdb is a symbolic link; remove it" }
    if (-not (Test-Path $devdb)) {
      Step '/bin/mkdir' @('-m', '700', $devdb)  # not PowerShell's mkdir function
      Step 'chown' @('postgres:', $devdb)
    }
    if ((Get-Output 'stat' @('-c', '%U', $devdb)) -ne 'postgres') { Die "$devdb is not owned by the postgres user; remove it" }
  } else {
    if (-not (Test-Path $devdb)) { Write-Host "==> mkdir $devdb"; New-Item -ItemType Directory -Path $devdb | Out-Null }
  }
  if (-not $version) {
    # The superuser is wordloom with the runbook's password; every connection needs it (scram-sha-256).
    $pwfile = Join-Path $devdb 'pwfile'
    try {
      Set-Content -Path $pwfile -Value $DevDbPassword -Encoding Ascii -NoNewline
      if ($IsRoot) { Step 'chown' @('postgres:', $pwfile) }
      # UTF-8 ctype so that words in Chinese titles are letters, not separators.
      # (Windows: the system locale; UTF8 encoding goes with any locale there.)
      $initdbArgs = @('-D', $data, '-U', $DevDbUser, "--pwfile=$pwfile", '--auth=scram-sha-256', '--encoding=UTF8')
      if (-not $OnWindows) {
        $locale = 'C'
        if ((Get-Output 'locale' @('-a') -Optional) -match '(?im)^c\.utf-?8$') {
          $locale = 'C.UTF-8'
        } else {
          Write-Host '    warning: no C.UTF-8 locale here; the cluster uses locale C (Chinese search may be weaker)'
        }
        $initdbArgs += "--locale=$locale"
      }
      Step-AsOwner (Join-Path $bindir "initdb$ExeSuffix") $initdbArgs
    } finally {
      Remove-Item -Path $pwfile -Force -ErrorAction SilentlyContinue
    }
    Write-Host "==> configure $(Join-Path $data 'postgresql.conf'): port $DevDbPort, listen 127.0.0.1, socket in $devdb"
    $conf = @('', '# --- chronicle dev cluster (.\run.ps1 db-start) ---', "port = $DevDbPort", "listen_addresses = '127.0.0.1'")
    # Windows: TCP only (no Unix-domain socket by default).
    if (-not $OnWindows) { $conf += "unix_socket_directories = '$devdb'" }
    Add-Content -Path (Join-Path $data 'postgresql.conf') -Value $conf -Encoding Ascii
  }
  if (-not (Start-AsOwner $pgctl @('-D', $data, '-l', $log, '-w', '-t', '60', 'start'))) {
    if (Test-Path $log) { Get-Content $log -Tail 20 | ForEach-Object { [Console]::Error.WriteLine($_) } }
    Die "the dev database did not start (log: $log)"
  }
  $exists = Get-Output $psql @('-X', '-w', '-h', '127.0.0.1', '-p', "$DevDbPort", '-U', $DevDbUser,
    '-d', 'postgres', '-Atqc', "select 1 from pg_database where datname = '$DevDbName'")
  if ($exists -ne '1') {
    Step (Join-Path $bindir "createdb$ExeSuffix") @('-h', '127.0.0.1', '-p', "$DevDbPort", '-U', $DevDbUser, $DevDbName)
  }
  Write-Host "dev database running (data: $data, log: $log)"
  Write-Host "DATABASE_URL=$DevDatabaseUrl"
  Write-Host "    `$env:DATABASE_URL='$DevDatabaseUrl'"
}

function Verb-DbStop {
  if (Test-Docker) {
    $state = Get-DockerState
    if ($state -eq 'running') { Step 'docker' @('stop', $DockerName); return }
    if ($state) { Write-Host "dev database is not running (docker container ${DockerName}: $state)"; return }
  }
  $devdb = Get-DevDbDir
  $data = Join-Path $devdb 'data'
  if (-not (Test-Path (Join-Path $data 'PG_VERSION'))) {
    Write-Host "no dev database at $data; nothing to stop"
    return
  }
  $bindir = Find-PgBinDir (Get-Content (Join-Path $data 'PG_VERSION') -TotalCount 1).Trim()
  if (-not $bindir) { Die 'no PostgreSQL server binaries (pg_ctl) found; install PostgreSQL server binaries (https://www.postgresql.org/download/)' }
  $pgctl = Join-Path $bindir "pg_ctl$ExeSuffix"
  if (-not (Test-QuietAsOwner $pgctl @('status', '-D', $data))) {
    Write-Host 'dev database is not running'
    return
  }
  Step-AsOwner $pgctl @('-D', $data, '-m', 'fast', '-w', 'stop')
}

# Stops the dev cluster and deletes its data folder (with --yes; without, says what it would
# delete and exits 2). The runbook's Docker container is not ours to remove: it says how.
function Verb-DbDestroy([string[]]$Arguments) {
  $yes = $false
  foreach ($a in $Arguments) {
    if ($a -eq '--yes') { $yes = $true } else { Show-Usage; [Console]::Error.WriteLine("error: db-destroy takes --yes only, not '$a'"); exit 2 }
  }
  $state = if (Test-Docker) { Get-DockerState } else { '' }
  if ($state) {
    Write-Host "    the runbook's Docker container $DockerName ($state) is not removed here; docker rm -f -v $DockerName removes it and its data"
  }
  $devdb = Get-DevDbDir
  $data = Join-Path $devdb 'data'
  if (-not (Test-Path $devdb)) {
    Write-Host "no dev cluster at $devdb; nothing to delete"
    return
  }
  $bytes = 0
  Get-ChildItem -Path $devdb -Recurse -Force -File -ErrorAction SilentlyContinue | ForEach-Object { $bytes += $_.Length }
  $mb = [math]::Ceiling($bytes / 1048576)
  if (-not $yes) {
    [Console]::Error.WriteLine("error: db-destroy deletes the dev cluster at $devdb ($mb MB), every database in it, for good; confirm with .\run.ps1 db-destroy --yes")
    exit 2
  }
  if (Test-Path (Join-Path $data 'PG_VERSION')) {
    $bindir = Find-PgBinDir (Get-Content (Join-Path $data 'PG_VERSION') -TotalCount 1).Trim()
    if ($bindir -and (Test-QuietAsOwner (Join-Path $bindir "pg_ctl$ExeSuffix") @('status', '-D', $data))) {
      Step-AsOwner (Join-Path $bindir "pg_ctl$ExeSuffix") @('-D', $data, '-m', 'fast', '-w', 'stop')
    }
  }
  Write-Host "==> Remove-Item -Recurse -Force $devdb"
  Remove-Item -Path $devdb -Recurse -Force
  Write-Host "dev cluster deleted ($devdb, $mb MB)"
}

# DATABASE_URL, else user postgres on 127.0.0.1:5432 (database CHRONICLE_DEMO_DB, default
# chronicle_demo), else the dev database.
function Use-DemoDatabase {
  if ($env:DATABASE_URL) {
    Write-Host ('    DATABASE_URL from the environment: ' + (Hide-Password $env:DATABASE_URL) + '; the demo injects 5000 events into it')
    return
  }
  if ($DemoDbName -cnotmatch '^[a-z_][a-z0-9_]*$') {
    Die "CHRONICLE_DEMO_DB=${DemoDbName}: a database name is lowercase letters, digits and _ (not first a digit)"
  }
  if (Test-PgReady '127.0.0.1' 5432) {
    $psql = Find-Psql
    if ($psql) {
      # Probe without a password, as the chronicle binary will connect (it reads no PGPASSWORD or pgpass file).
      Set-Env 'PGPASSWORD' $null
      Set-Env 'PGPASSFILE' (Join-Path $Root '.devdb-no-pgpass')
      $admin = @('-X', '-w', '-h', '127.0.0.1', '-p', '5432', '-U', 'postgres', '-d', 'postgres')
      if (Test-Quiet $psql ($admin + @('-c', 'select 1'))) {
        $exists = Get-Output $psql ($admin + @('-Atqc', "select 1 from pg_database where datname = '$DemoDbName'"))
        if ($exists -ne '1') {
          Step $psql ($admin + @('-c', "create database $DemoDbName"))
        } else {
          Write-Host "    database $DemoDbName already exists on 127.0.0.1:5432 (CHRONICLE_DEMO_DB or DATABASE_URL picks another)"
        }
        Set-Env 'DATABASE_URL' $DemoDatabaseUrl
        Write-Host "    using $env:DATABASE_URL"
        return
      }
      Write-Host '    127.0.0.1:5432 does not accept user postgres without a password; using the dev database'
    } else {
      Write-Host '    psql is not installed, so no database can be created on 127.0.0.1:5432; using the dev database'
    }
  } else {
    Write-Host '    no PostgreSQL on 127.0.0.1:5432; using the dev database'
  }
  Verb-DbStart
  Set-Env 'DATABASE_URL' $DevDatabaseUrl
}

function Verb-Demo {
  $lib = ''
  Use-DemoDatabase
  Build-Release
  Step $Bin @('migrate')
  Step $Bin @('inject', '--count', '5000')
  if (Test-Quiet $Bin @('help', 'worker')) {
    if (-not $env:OUTBOX_RUN_SECONDS) { Set-Env 'OUTBOX_RUN_SECONDS' '5' }
    Set-WorkerDefaults '0'
    Step $Bin @('worker')
  } else {
    Write-Host 'the worker is not built yet; events are queued in the outbox'
  }
  $psql = Find-Psql
  $url = ConvertTo-LibpqUrl $env:DATABASE_URL
  if (Test-Quiet $Bin @('help', 'status')) {
    Step $Bin @('status')
  } elseif ($psql) {
    Write-Host '    chronicle status is not available yet; asking psql'
    Step $psql @('-X', '-v', 'ON_ERROR_STOP=1', '-d', $url,
      '-c', 'select status, count(*) from chronicle_outbox_events group by 1 order by 1',
      '-c', 'select count(*) from chronicle_entries')
  } else {
    Write-Host 'chronicle status is not available yet, and psql is not installed to look instead'
  }
  if ($psql) {
    $lib = Get-Output $psql @('-X', '-w', '-d', $url, '-Atqc', 'select library_id from chronicle_events order by occurred_at, id limit 1')
  }
  if ($lib -notmatch '^[0-9a-fA-F-]{36}$') {
    Write-Host "no library id to show (psql is missing or chronicle_events is empty); try: $Bin entries --library-id <id> --limit 10"
  } elseif (Test-Quiet $Bin @('help', 'entries')) {
    Step $Bin @('entries', '--library-id', $lib, '--limit', '10')
  } elseif ($psql) {
    Write-Host '    chronicle entries is not available yet; asking psql'
    Step $psql @('-X', '-v', 'ON_ERROR_STOP=1', '-d', $url,
      '-c', "select occurred_at, summary from chronicle_entries where library_id = '$lib' order by occurred_at desc, id desc limit 10")
  } else {
    Write-Host 'chronicle entries is not available yet, and psql is not installed to look instead'
  }
}

# `chronicle status --exact --json`: entries and the outbox by state, or $null when status fails
# or its answer lacks one of them. Exact: on a large database status would otherwise estimate
# the entries, and the smoke run compares them before and after.
function Read-Status {
  $json = Get-Output $Bin @('status', '--exact', '--json') -Optional
  if (-not $json) { return $null }
  try { $o = $json | ConvertFrom-Json } catch { return $null }
  if ($null -eq $o.entries -or $null -eq $o.outbox -or $null -eq $o.outbox.pending -or $null -eq $o.outbox.processing -or
      $null -eq $o.outbox.done -or $null -eq $o.outbox.failed) { return $null }
  return [pscustomobject]@{
    Entries    = [long]$o.entries
    Pending    = [long]$o.outbox.pending
    Processing = [long]$o.outbox.processing
    Done       = [long]$o.outbox.done
    Failed     = [long]$o.outbox.failed
  }
}

function Format-Status($St) {
  return "$($St.Entries) entries; outbox: pending $($St.Pending), processing $($St.Processing), done $($St.Done), failed $($St.Failed)"
}

# The runbook's smoke run (section 6.2, steps 1-4), with a verdict: exit 1 when the worker
# exits non-zero or logs an ERROR line, or afterwards rows are processing or failed, or
# chronicle_entries did not grow. An empty outbox first gets 100 injected events.
# Is DATABASE_URL the dev database (the same URL, whatever its scheme)?
function Test-DevDatabase { return (($env:DATABASE_URL -replace '^[^:]*://', '') -eq ($DevDatabaseUrl -replace '^[^:]*://', '')) }

function Verb-Smoke([string[]]$Arguments) {
  $problems = @()
  $container = ''
  $injected = $false
  $yes = ($env:CHRONICLE_SMOKE_WRITE -eq '1')
  $q1 = 'select status, count(*) from chronicle_outbox_events group by 1 order by 1;'
  $q2 = 'select count(*) from chronicle_entries;'
  foreach ($p in $Arguments) {
    if ($p -eq '--yes') { $yes = $true } else { Show-Usage; [Console]::Error.WriteLine("error: smoke takes --yes only, not '$p'"); exit 2 }
  }
  if ($env:DATABASE_URL) {
    Write-Host ('    DATABASE_URL from the environment: ' + (Hide-Password $env:DATABASE_URL))
  } else {
    Write-Host "    DATABASE_URL is not set; using the runbook's dev database: $DevDatabaseUrl"
    Verb-DbStart
    if ((Test-Docker) -and ((Get-DockerState) -eq 'running')) { $container = $DockerName }
    Set-Env 'DATABASE_URL' $DevDatabaseUrl
  }
  Build-Release
  Step $Bin @('migrate')
  $st = Read-Status
  if (-not $st) { Die 'chronicle status --exact --json failed or answered something unexpected' }
  $before = $st.Entries
  Write-Host ('    before: ' + (Format-Status $st))
  if ($st.Pending -eq 0 -and -not (Test-DevDatabase) -and -not $yes) {
    [Console]::Error.WriteLine('error: nothing is pending in the outbox, and the smoke run would inject 100 synthetic events (1 library) into ' +
      'DATABASE_URL, which is not the dev database; allow it with .\run.ps1 smoke --yes (or CHRONICLE_SMOKE_WRITE=1), ' +
      'or queue events there first')
    exit 2
  }
  if ($st.Pending -eq 0) {
    Write-Host '    nothing is pending in the outbox: injecting 100 synthetic events (1 library) for the worker to project'
    Step $Bin @('inject', '--count', '100', '--libraries', '1')
    $injected = $true
  }
  if (-not $env:OUTBOX_RUN_SECONDS) { Set-Env 'OUTBOX_RUN_SECONDS' '2' }
  Set-WorkerDefaults '9110'
  # The worker's log (stderr) is shown as it comes and kept, to look for ERROR lines.
  Show-Command $Bin @('worker')
  $log = New-Object System.Collections.Generic.List[string]
  $ErrorActionPreference = 'Continue'
  & $Bin worker 2>&1 | ForEach-Object {
    $line = "$_"
    if ($_ -is [System.Management.Automation.ErrorRecord]) { [Console]::Error.WriteLine($line) } else { Write-Host $line }
    $log.Add($line)
  }
  $rc = $LASTEXITCODE
  $ErrorActionPreference = 'Stop'
  if ($rc -ne 0) {
    $problems += "the worker exited with $rc (1: failure, 2: configuration, 3: database unreachable or refusing us)"
  }
  $errors = @($log | Where-Object { $_ -match '^\[[^\]]* ERROR |"level": ?"ERROR"' })
  if ($errors.Count -gt 0) { $problems += ("the worker logged ERROR lines:`n" + ($errors -join "`n")) }
  Write-Host "==> the runbook's acceptance queries"
  $psql = Find-Psql
  if ($psql) {
    if (-not (Test-Step $psql @('-X', '-w', '-v', 'ON_ERROR_STOP=1', '-d', (ConvertTo-LibpqUrl $env:DATABASE_URL), '-c', $q1, '-c', $q2))) {
      $problems += 'psql could not run the acceptance queries'
    }
  } elseif ($container) {
    if (-not (Test-Step 'docker' @('exec', $container, 'psql', '-U', $DevDbUser, '-d', $DevDbName, '-c', $q1)) -or
        -not (Test-Step 'docker' @('exec', $container, 'psql', '-U', $DevDbUser, '-d', $DevDbName, '-c', $q2))) {
      $problems += "docker exec $container psql could not run the acceptance queries"
    }
  } else {
    Write-Host '    psql is not installed: chronicle status shows the same counts'
    if (-not (Test-Step $Bin @('status'))) { $problems += 'chronicle status failed' }
  }
  $st = Read-Status
  if ($st) {
    Write-Host ('    after: ' + (Format-Status $st))
    if ($st.Processing -gt 0) {
      $problems += "$($st.Processing) outbox row(s) still processing after the worker stopped (another worker on this database?)"
    }
    if ($st.Failed -gt 0) {
      $problems += "$($st.Failed) event(s) failing (their delivery failed): see chronicle status and chronicle show EVENT_ID; after the fix, chronicle replay-failed"
    }
    if ($st.Entries -le $before) {
      $problems += "chronicle_entries did not grow ($before before, $($st.Entries) after): the worker projected nothing new in $env:OUTBOX_RUN_SECONDS s"
    }
  } else {
    $problems += 'chronicle status --exact --json failed after the worker ran'
  }
  if ($problems.Count -gt 0) {
    [Console]::Error.WriteLine('smoke run FAILED:')
    foreach ($p in $problems) { [Console]::Error.WriteLine("  - $p") }
    exit 1
  }
  $note = if ($injected) { ' (100 events injected)' } else { '' }
  Write-Host "smoke run OK: the worker exited 0 without an ERROR line; entries $before -> $($st.Entries)$note; none processing or failed"
}

# A local Prometheus in the foreground (Ctrl+C stops it): monitoring/alerts.yml loaded, job
# chronicle scraping the local worker; its config and data in a folder per port under the temp folder.
function Verb-Monitoring {
  Assert-Prometheus
  $metricsPort = if ($env:OUTBOX_METRICS_PORT) { $env:OUTBOX_METRICS_PORT } else { '9110' }
  $target = "127.0.0.1:$metricsPort"
  if ($env:PROMETHEUS_PORT) {
    if ($env:PROMETHEUS_PORT -notmatch '^[0-9]+$') { Die "PROMETHEUS_PORT=$env:PROMETHEUS_PORT is not a port number" }
    $port = [int]$env:PROMETHEUS_PORT
    if (Test-TcpOpen '127.0.0.1' $port) { Die "PROMETHEUS_PORT=${port}: 127.0.0.1:$port is taken" }
  } else {
    $port = 9090
    while ($port -lt 9110 -and (Test-TcpOpen '127.0.0.1' $port)) {
      Write-Host "    127.0.0.1:$port is taken; trying the next port"
      $port++
    }
    if ($port -ge 9110) { Die 'no free port in 9090-9109; set PROMETHEUS_PORT' }
  }
  $dir = Join-Path ([IO.Path]::GetTempPath()) "chronicle-prometheus-$port"
  $data = Join-Path $dir 'data'
  New-Item -ItemType Directory -Force -Path $data | Out-Null
  $yml = Join-Path $dir 'prometheus.yml'
  $rules = (Join-Path (Join-Path $Root 'monitoring') 'alerts.yml') -replace "'", "''"
  Write-Host "==> write ${yml}: job chronicle scraping $target every 5 s, rules monitoring/alerts.yml"
  $lines = @(
    '# Written by .\run.ps1 monitoring.'
    'global:'
    '  scrape_interval: 5s'
    '  evaluation_interval: 5s'
    'rule_files:'
    "  - '$rules'"
    'scrape_configs:'
    '  - job_name: chronicle'
    '    static_configs:'
    "      - targets: ['$target']"
  )
  # UTF-8 without a byte order mark (Set-Content -Encoding UTF8 writes one in Windows PowerShell).
  [IO.File]::WriteAllText($yml, (($lines -join "`n") + "`n"))
  Step 'promtool' @('check', 'config', $yml)
  Write-Host "Prometheus: http://127.0.0.1:$port  (targets: /targets, alerts: /alerts); Ctrl+C stops it"
  Write-Host "    it scrapes the worker's metrics on $target (.\run.ps1 worker); Grafana: import monitoring/grafana-dashboard.json"
  $promArgs = @("--config.file=$yml", "--storage.tsdb.path=$data", "--web.listen-address=127.0.0.1:$port")
  Show-Command 'prometheus' $promArgs
  $ErrorActionPreference = 'Continue'
  & prometheus @promArgs
  exit $LASTEXITCODE
}

# ---------------------------------------------------------------- dispatch
# One verb per arm, in the same order as the case in run.sh (a test compares them).

if ($Verb -eq '-h' -or $Verb -eq '--help') { $Verb = 'help' }
Push-Location $Root
try {
switch ($Verb) {
  'help' { Show-Usage }
  'build' { Verb-Build $Rest }
  'test' { Verb-Test $Rest }
  'check-all' { Verb-CheckAll $Rest }
  'migrate' { Verb-Migrate $Rest }
  'worker' { Verb-Worker $Rest }
  'db-start' { Verb-DbStart }
  'db-stop' { Verb-DbStop }
  'db-destroy' { Verb-DbDestroy $Rest }
  'demo' { Verb-Demo }
  'smoke' { Verb-Smoke $Rest }
  'monitoring' { Verb-Monitoring }
  default { Show-Usage; [Console]::Error.WriteLine("error: unknown verb '$Verb'"); exit 2 }
}
} finally {
  Restore-Env
  Pop-Location
}
