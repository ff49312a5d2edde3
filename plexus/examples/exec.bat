@echo off
rem OpenVPN point-to-point over the endpoints plexus punched (Windows). plexus runs it as
rem   exec.bat innerip innerport outerip outerport peerip peerport secret
rem The side whose outer endpoint sorts first takes the first tunnel address, so the two ends differ.
rem PLEXUS_OPENVPN_KEY must name an OpenVPN static key file shared by both hosts
rem (create one with: openvpn --genkey secret static.key).
setlocal
if "%~7"=="" (
    echo usage: %~nx0 innerip innerport outerip outerport peerip peerport secret 1>&2
    exit /b 2
)
if "%PLEXUS_OPENVPN_KEY%"=="" (
    echo PLEXUS_OPENVPN_KEY must name a static key file 1>&2
    exit /b 2
)
if "%PLEXUS_TUNNEL_SUBNET%"=="" set PLEXUS_TUNNEL_SUBNET=10.255.0
if "%~3:%~4" LSS "%~5:%~6" (
    set LOCAL_ADDRESS=%PLEXUS_TUNNEL_SUBNET%.1
    set REMOTE_ADDRESS=%PLEXUS_TUNNEL_SUBNET%.2
) else (
    set LOCAL_ADDRESS=%PLEXUS_TUNNEL_SUBNET%.2
    set REMOTE_ADDRESS=%PLEXUS_TUNNEL_SUBNET%.1
)
openvpn --dev tun --proto udp --local %1 --lport %2 --remote %5 --rport %6 ^
    --ifconfig %LOCAL_ADDRESS% %REMOTE_ADDRESS% ^
    --secret "%PLEXUS_OPENVPN_KEY%" --cipher AES-256-CBC --auth SHA256 ^
    --ping 5 --ping-restart 60 --verb 3
