#!/usr/bin/env bash
# Compile the app's pure-Kotlin core and run its JUnit 4 tests on this machine's JVM, without
# Gradle or the Android SDK (neither is reachable here). Tools: the npm `kotlin-compiler` package
# (a full Kotlin compiler) in android_demo/.tools, Debian's junit4 + hamcrest jars, JDK 17.
# Installs what is missing; prints the JUnit summary and exits non-zero on any failure.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
tools="$here/.tools"
build="$here/build/jvm"
KOTLIN_VERSION=2.4.20

if [ ! -x "$tools/node_modules/kotlin-compiler/bin/kotlinc" ]; then
  mkdir -p "$tools"
  (cd "$tools" && npm install --silent --no-audit --no-fund "kotlin-compiler@$KOTLIN_VERSION" >/dev/null)
fi
if [ ! -f /usr/share/java/junit4.jar ] || ! command -v javac >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null && apt-get install -y -qq junit4 openjdk-17-jdk-headless >/dev/null
  else
    echo "need Debian packages junit4 and openjdk-17-jdk-headless" >&2; exit 2
  fi
fi
kotlinc="$tools/node_modules/kotlin-compiler/bin/kotlinc"
kotlin_home="$tools/node_modules/kotlin-compiler"
junit=/usr/share/java/junit4.jar:/usr/share/java/hamcrest-core.jar
stdlib="$kotlin_home/lib/kotlin-stdlib.jar"

rm -rf "$build" && mkdir -p "$build/main" "$build/test"
echo "compiling android_demo/core (Kotlin $KOTLIN_VERSION)..."
"$kotlinc" -nowarn -jvm-target 17 -d "$build/main" $(find "$here/core/src/main/kotlin" -name '*.kt')
"$kotlinc" -nowarn -jvm-target 17 -cp "$build/main:$junit" -d "$build/test" $(find "$here/core/src/test/kotlin" -name '*.kt')
classes=$(cd "$build/test" && find . -name '*Test.class' | sed 's|^\./||; s|\.class$||; s|/|.|g' | sort)
java -cp "$build/main:$build/test:$here/core/src/test/resources:$junit:$stdlib" org.junit.runner.JUnitCore $classes | tee "$build/junit.txt" | grep -vE '^\s+at ' 
# JUnitCore exits 1 on failure; its last lines are "OK (N tests)" or "Tests run: N,  Failures: M"
grep -q '^OK (' "$build/junit.txt"
