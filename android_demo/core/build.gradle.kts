// Pure Kotlin/JVM: manifest, chat formatting, stop handling, stats. No Android classes, so the same
// sources are compiled and unit-tested on a plain JVM (../run_jvm_tests.sh does it without Gradle).
plugins {
    id("org.jetbrains.kotlin.jvm")
}

java {
    sourceCompatibility = JavaVersion.VERSION_11
    targetCompatibility = JavaVersion.VERSION_11
}

kotlin {
    jvmToolchain(17)
    compilerOptions { jvmTarget.set(org.jetbrains.kotlin.gradle.dsl.JvmTarget.JVM_11) }
}

dependencies {
    testImplementation("junit:junit:4.13.2")
}
