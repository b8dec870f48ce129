# metal.cmake — whether and how trimcpp_core gets the Metal backend (included by csrc/CMakeLists.txt).
#
# TRIMCPP_METAL: AUTO (default) builds Metal on Apple machines when a probe compiles this folder's
# host code and kernels with the toolchain at hand, and otherwise builds the stub with a warning, so
# that the install never fails because of Metal; ON builds it or stops with the probe's error; OFF
# builds the stub. TRIMCPP_METAL_PROBE=ON runs the probe on any system (CI checks the failure path on
# Linux with it). _core.metal_device() says why a build has no Metal.

set(TRIMCPP_METAL AUTO CACHE STRING "Metal backend: AUTO (on Apple when it compiles), ON or OFF")
set_property(CACHE TRIMCPP_METAL PROPERTY STRINGS AUTO ON OFF)
option(TRIMCPP_METAL_PROBE "Run the Metal probe on any system (to test its failure path)" OFF)
string(TOUPPER "${TRIMCPP_METAL}" trimcpp_metal_mode)
if(trimcpp_metal_mode MATCHES "^(1|TRUE|YES|Y)$")
  set(trimcpp_metal_mode ON)
elseif(trimcpp_metal_mode MATCHES "^(0|FALSE|NO|N)$")
  set(trimcpp_metal_mode OFF)
endif()
if(NOT trimcpp_metal_mode MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "TRIMCPP_METAL must be AUTO, ON or OFF, got '${TRIMCPP_METAL}'")
endif()

set(CMAKE_OBJCXX_STANDARD 17)  # select.mm is C++17, like the rest of csrc/
set(CMAKE_OBJCXX_STANDARD_REQUIRED ON)
set(trimcpp_metal_dir ${CMAKE_CURRENT_LIST_DIR})
set(trimcpp_csrc_dir ${CMAKE_CURRENT_LIST_DIR}/..)

# How select.metal is compiled, by the probe and by the build (no fast math: exact IEEE rounding, as
# the CPU backend and the emulator in tests/ compute).
set(trimcpp_metal_compile xcrun -sdk macosx metal -std=metal3.0 -fno-fast-math -I ${trimcpp_csrc_dir}
    -c ${trimcpp_metal_dir}/select.metal)

# Sets trimcpp_metal_probe_error to why this toolchain cannot build the Metal backend ("" if it can).
function(trimcpp_probe_metal)
  set(error "")
  execute_process(COMMAND xcrun -sdk macosx -f metal RESULT_VARIABLE status OUTPUT_QUIET ERROR_QUIET)
  if(NOT status EQUAL 0)
    set(error "no Metal compiler ('xcrun -sdk macosx -f metal' failed; Xcode's command-line tools lack it)")
  endif()
  if(NOT error)
    set(air ${CMAKE_BINARY_DIR}/metal-probe/select.air)
    file(MAKE_DIRECTORY ${CMAKE_BINARY_DIR}/metal-probe)
    execute_process(COMMAND ${trimcpp_metal_compile} -o ${air}
                    RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE err)
    if(status EQUAL 0)
      execute_process(COMMAND xcrun -sdk macosx metallib ${air} -o ${CMAKE_BINARY_DIR}/metal-probe/probe.metallib
                      RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE err)
      if(NOT status EQUAL 0)
        set(error "metallib failed: ${out}${err}")
      endif()
    else()
      set(error "the kernels (select.metal) do not compile: ${out}${err}")
    endif()
  endif()
  if(NOT error)
    include(CheckLanguage)
    check_language(OBJCXX)
    if(NOT CMAKE_OBJCXX_COMPILER)
      set(error "no Objective-C++ compiler")
    endif()
  endif()
  if(NOT error)
    enable_language(OBJCXX)
    set(CMAKE_TRY_COMPILE_TARGET_TYPE STATIC_LIBRARY)  # select.mm has no main()
    try_compile(host_ok ${CMAKE_BINARY_DIR}/metal-probe/host
                SOURCES ${trimcpp_metal_dir}/select.mm
                CMAKE_FLAGS "-DINCLUDE_DIRECTORIES=${trimcpp_csrc_dir}"
                COMPILE_DEFINITIONS -fobjc-arc
                OBJCXX_STANDARD 17 OBJCXX_STANDARD_REQUIRED ON
                OUTPUT_VARIABLE log)
    if(NOT host_ok)
      set(error "the host code (select.mm) does not compile: ${log}")
    endif()
  endif()
  if(error)
    string(REGEX REPLACE "[\r\n]+" " " error "${error}")
    string(SUBSTRING "${error}" 0 300 error)
  endif()
  set(trimcpp_metal_probe_error "${error}" PARENT_SCOPE)
endfunction()

set(trimcpp_build_metal OFF)
set(trimcpp_metal_off_reason "TRIMCPP_METAL=OFF")
if(trimcpp_metal_mode STREQUAL "AUTO" AND NOT APPLE AND NOT TRIMCPP_METAL_PROBE)
  set(trimcpp_metal_off_reason "not an Apple system")
elseif(NOT trimcpp_metal_mode STREQUAL "OFF")
  trimcpp_probe_metal()
  if(NOT trimcpp_metal_probe_error)
    set(trimcpp_build_metal ON)
  elseif(trimcpp_metal_mode STREQUAL "ON")
    message(FATAL_ERROR "TRIMCPP_METAL=ON, but the Metal backend cannot be built here: ${trimcpp_metal_probe_error}")
  else()
    set(trimcpp_metal_off_reason "probe failed: ${trimcpp_metal_probe_error}")
    message(WARNING "trimcpp: building WITHOUT the Metal backend (the CPU backend is complete; backend=None "
                    "would pick Metal only from 1024 rows): ${trimcpp_metal_probe_error}\n"
                    "Please report this with the lines above and your Xcode version (xcodebuild -version). "
                    "-DTRIMCPP_METAL=OFF silences this warning; -DTRIMCPP_METAL=ON makes it an error.")
  endif()
endif()

if(trimcpp_build_metal)
  enable_language(OBJCXX)
  target_sources(trimcpp_core PRIVATE ${trimcpp_metal_dir}/select.mm)
  set_source_files_properties(${trimcpp_metal_dir}/select.mm PROPERTIES COMPILE_OPTIONS "-fobjc-arc")
  target_link_libraries(trimcpp_core PRIVATE "-framework Metal" "-framework Foundation")
  # The kernels, compiled offline into trimcpp.metallib next to _core.
  set(metallib ${CMAKE_CURRENT_BINARY_DIR}/trimcpp.metallib)
  add_custom_command(
    OUTPUT ${metallib}
    COMMAND ${trimcpp_metal_compile} -o ${CMAKE_CURRENT_BINARY_DIR}/select.air
    COMMAND xcrun -sdk macosx metallib ${CMAKE_CURRENT_BINARY_DIR}/select.air -o ${metallib}
    DEPENDS ${trimcpp_metal_dir}/select.metal ${trimcpp_csrc_dir}/gpu/arith.h)
  add_custom_target(trimcpp_metallib ALL DEPENDS ${metallib})
  add_dependencies(trimcpp_core trimcpp_metallib)
  install(FILES ${metallib} DESTINATION trimcpp)
  message(STATUS "trimcpp: Metal backend ON")
else()
  # no_metal.cpp reports why (the reason as a C string in a generated header).
  string(REPLACE "\\" "\\\\" reason "${trimcpp_metal_off_reason}")
  string(REPLACE "\"" "\\\"" reason "${reason}")
  file(WRITE ${CMAKE_CURRENT_BINARY_DIR}/trimcpp_metal_off.h "#define TRIMCPP_METAL_OFF_REASON \"${reason}\"\n")
  target_sources(trimcpp_core PRIVATE ${trimcpp_metal_dir}/no_metal.cpp)
  target_include_directories(trimcpp_core PRIVATE ${CMAKE_CURRENT_BINARY_DIR})
  message(STATUS "trimcpp: Metal backend OFF (${trimcpp_metal_off_reason})")
endif()
