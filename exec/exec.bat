@echo off
rem OpenVPN point-to-point over the endpoints plexus punched (Windows), in TLS mode with pinned self-signed
rem certificates, as exec.sh does on Linux (a Linux and a Windows host can pair). Untested on Windows.
rem
rem One-time setup on each host (an administrator's prompt; openssl.exe comes with OpenVPN's installer):
rem   exec.bat init          makes key.pem and cert.pem in %PLEXUS_OPENVPN_DIR% (default
rem                          %ProgramData%\plexus\openvpn) and prints this host's fingerprint
rem   put the PEER's fingerprint (its `exec.sh fingerprint` or `exec.bat fingerprint`) into
rem   %PLEXUS_OPENVPN_DIR%\peer-fingerprint, as one line AB:CD:...
rem
rem Run mode, as plexus launches it (6 arguments recommended; plexus's default 7th, the secret, is ignored):
rem   exec.bat innerip innerport outerip outerport peerip peerport [secret]
rem The side whose outer endpoint sorts first is the TLS server and takes the first tunnel address.
rem PLEXUS_TUNNEL_SUBNET (default 10.255.0) and PLEXUS_OPENVPN_ARGS work as for exec.sh.
setlocal
if "%PLEXUS_OPENVPN_DIR%"=="" set "PLEXUS_OPENVPN_DIR=%ProgramData%\plexus\openvpn"
set "DIR=%PLEXUS_OPENVPN_DIR%"

if /i "%~1"=="init" (
    if exist "%DIR%\key.pem" (
        echo %~nx0: %DIR% already holds a key: not overwriting it 1>&2
        exit /b 1
    )
    if not exist "%DIR%" mkdir "%DIR%"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 -days 36500 ^
        -subj "/CN=plexus %COMPUTERNAME%" -keyout "%DIR%\key.pem" -out "%DIR%\cert.pem" 2>nul
    if errorlevel 1 (
        echo %~nx0: openssl could not make the key and certificate in %DIR% 1>&2
        exit /b 1
    )
    icacls "%DIR%\key.pem" /inheritance:r /grant:r "*S-1-5-18:F" "*S-1-5-32-544:F" >nul
    goto fingerprint
)
if /i "%~1"=="fingerprint" goto fingerprint

if "%~6"=="" (
    echo usage: %~nx0 innerip innerport outerip outerport peerip peerport [secret] 1>&2
    echo        %~nx0 init ^| %~nx0 fingerprint 1>&2
    exit /b 2
)
for %%f in (key.pem cert.pem) do if not exist "%DIR%\%%f" (
    echo %~nx0: no %DIR%\%%f: run `%~nx0 init` once on this host 1>&2
    exit /b 1
)
if not exist "%DIR%\peer-fingerprint" (
    echo %~nx0: no %DIR%\peer-fingerprint: put the peer's fingerprint there 1>&2
    exit /b 1
)
set /p PEER_FINGERPRINT=<"%DIR%\peer-fingerprint"
if "%PLEXUS_TUNNEL_SUBNET%"=="" set PLEXUS_TUNNEL_SUBNET=10.255.0
if "%~3:%~4" LSS "%~5:%~6" (
    set LOCAL_ADDRESS=%PLEXUS_TUNNEL_SUBNET%.1
    set REMOTE_ADDRESS=%PLEXUS_TUNNEL_SUBNET%.2
    set ROLE=--tls-server --dh none
) else (
    set LOCAL_ADDRESS=%PLEXUS_TUNNEL_SUBNET%.2
    set REMOTE_ADDRESS=%PLEXUS_TUNNEL_SUBNET%.1
    set ROLE=--tls-client
)
openvpn --dev tun --proto udp --local %1 --lport %2 --remote %5 --rport %6 ^
    --ifconfig %LOCAL_ADDRESS% %REMOTE_ADDRESS% ^
    %ROLE% --cert "%DIR%\cert.pem" --key "%DIR%\key.pem" --peer-fingerprint %PEER_FINGERPRINT% ^
    --ping 5 --ping-exit 30 --tls-exit --verb 3 %PLEXUS_OPENVPN_ARGS%
exit /b %errorlevel%

:fingerprint
if not exist "%DIR%\cert.pem" (
    echo %~nx0: no certificate in %DIR%: run `%~nx0 init` first 1>&2
    exit /b 1
)
for /f "tokens=2 delims==" %%f in ('openssl x509 -in "%DIR%\cert.pem" -noout -fingerprint -sha256') do echo %%f
exit /b 0
